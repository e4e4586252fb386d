/*
 * The vm primitive's own header: shared by vm.c (handles, options, life cycle, the VMM spawn),
 * qemu.c and firecracker.c (the two drivers) and channel.c (the guest agent protocol, host
 * side). Nothing outside runtime/vm/ includes it.
 */
#ifndef CLAWLUA_VM_H
#define CLAWLUA_VM_H

#include "clawlua.h"

#include <stdint.h>

#define VM_MT      "clawlua.vm"
#define VM_WAIT    (-1) /* a step function's "not yet: wait for the next change" */
#define VM_MAX_FDS 6    /* fds a VMM inherits */

enum { VM_QEMU = 1, VM_FIRECRACKER = 2 };
enum { VS_CREATED, VS_STARTING, VS_RUNNING, VS_PAUSED, VS_STOPPING, VS_EXITED, VS_FAILED };
enum { CH_NONE, CH_SERIAL, CH_VSOCK };
enum { OP_START = 1, OP_PAUSE, OP_RESUME, OP_SNAPSHOT, OP_SHUTDOWN, OP_KILL, OP_WAIT, OP_METRICS };
#define VM_MAX_CALLS 12

typedef struct vm vm;
typedef struct vm_req vm_req;

#define MAX_VCPUS             32
#define MIN_MEM_MIB           32
#define DEFAULT_READY_TIMEOUT 60.0
#define LOG_TAIL              1500

/* What the core (vmm.c) releases through the layers above it: vm.create sets these. */
typedef struct vm_ops {
  void (*release)(vm *v, const char *why); /* the channel's connection, the driver's objects */
  void (*free_channel)(vm *v);             /* the channel's buffers, last */
} vm_ops;

/* The host side of the agent channel (channel.c). */
typedef struct vm_chan {
  int fd;
  cl_watch watch;
  int watching;
  unsigned char *in;
  size_t in_len;
  unsigned char *out;
  size_t out_off, out_len, out_cap;
  int ready;  /* READY seen on this connection */
  int closed; /* EOF, error or protocol violation: no more frames */
  char error[320];
  char uname[256];
  uint64_t agent_pid, boot_ms;
  uint32_t next_id;
  vm_req *reqs; /* requests in flight */
  cl_waitq writable;
  int throttled; /* reading paused until a streaming consumer catches up */
  uint64_t bytes_in, bytes_out;
  uint32_t probe_id; /* a PING whose PONG counts as READY (after a restore) */
} vm_chan;

/* A Firecracker API call still to make (firecracker.c). */
typedef struct vm_call {
  const char *method;
  char path[64];
  char *body;
} vm_call;

/* One Firecracker API call in flight (firecracker.c). */
typedef struct vm_api {
  void *easy; /* CURL * */
  void *hdrs; /* struct curl_slist * */
  int busy, done;
  int result; /* CURLcode */
  long status;
  char *body; /* response */
  size_t body_len;
  char method[8];
  char path[64];
  char *req_body;
} vm_api;

struct vm {
  const vm_ops *ops;
  int released;
  int state;
  int backend;
  int kvm;       /* QEMU: 0 tcg, 1 kvm, 2 kvm still to be proved by this boot (a probe) */
  int kvm_auto;  /* KVM was chosen, not asked for: a KVM boot that fails falls back to TCG */
  char why[320]; /* why this backend and accelerator */
  char id[48];
  lua_State *L; /* the main thread, for audit records from loop callbacks */
  cl_loop *loop;
  /* configuration */
  char *kernel, *initrd, *rootfs, *boot_args, *seccomp_file, *restore_dir;
  char **vmm; /* the VMM's argv prefix (program [, args]); NULL: the backend's default */
  int rootfs_ro;
  int no_acpi; /* the kernel has no ACPI: QEMU's microvm,acpi=off, devices on the command line */
  int vcpus, mem_mib;
  int channel;
  double ready_timeout;
  char mac[18];
  int cid;
  /* the VMM process: a clawlua.proc handle (jail.spawn or proc.spawn) in the registry */
  int proc_ref;
  int jailed;     /* spawned by clawlua.jail (jail = false: by proc.spawn) */
  int jail_ref;   /* the caller's jail options table, or LUA_NOREF */
  int filter_ref; /* seccomp: a clawlua filter (or Firecracker's {vmm=, api=, vcpu=}) */
  pid_t pid;
  int pidfd;
  cl_watch pwatch;
  int exited, exit_code, exit_signal;
  uint64_t t_create, t_spawn, t_ready, t_exit;
  /* files */
  char rundir[200];
  int rundir_given; /* run_dir= named it: made as it is (mkdir), not mkdtemp'd */
  char log_path[512];
  int logfd;
  int log_keep; /* the caller named the log: it stays */
  /* tap */
  char tap[16];
  int tapfd;
  int tap_persist; /* named, persistent tap (Firecracker): deleted on release */
  int tap_auto;
  /* QEMU: QMP */
  int qmpfd;
  cl_watch qwatch;
  char *qin;
  size_t qin_len;
  int qin_skip; /* dropping the rest of a message longer than the buffer */
  int qmp_greeted, qmp_ready;
  long qmp_next_id, qmp_wait_id;
  int qmp_have_reply, qmp_error;
  char *qmp_reply; /* JSON text of the "return" value, or the error description */
  int snapshot_fd; /* QEMU restore: the migration stream, given to the VMM at spawn */
  /* Firecracker */
  vm_api api;
  int fc_major, fc_minor;
  vm_call calls[VM_MAX_CALLS];
  int ncalls;
  char fc_version[32];
  int vsock_fd; /* the vsock UDS connection during its CONNECT hand-shake */
  cl_watch vwatch;
  char vsock_buf[32];
  size_t vsock_len;
  /* the guest channel */
  vm_chan chan;
  /* operations */
  const char *busy; /* the life-cycle operation in progress */
  int was_running;  /* snapshot: resume afterwards */
  double shutdown_timeout;
  char op_path[512];
  char op_error[600];
  cl_waitq changed; /* woken on every change a step function may wait for */
  cl_timer poll_timer;
  int probe_recorded; /* the failed KVM boot was recorded and its VMM killed */
  int restoring;      /* vm.restore's start: a failure releases the handle */
};

/*
 * The files call one way, top to bottom; nothing calls up except through v->ops:
 *   vm.c        the Lua binding: methods, life-cycle operations (step functions), vm.backend
 *   create.c    vm.create / vm.restore: options, checks, the objects made before the VMM runs
 *   qemu.c, firecracker.c   the drivers
 *   channel.c   the guest agent channel (host side) and its Lua methods (exec, files, ping)
 *   vmm.c       the core: state, audit, errors, the VMM process, release
 *   host.c      the kernel-facing bottom: taps, run directories, KVM probing and verdicts
 */

/* vm.c */

/* create.c */
int cl_vm_l_create(lua_State *L);
/* vm.restore up to its start: 0 with the vm at index 1 (vm.c starts it), or the count of the
 * failure results pushed. */
int cl_vm_restore_prepare(lua_State *L);

/* vmm.c */
extern const char cl_vm_ids_key; /* registry: id -> true for every live VM */
vm *cl_vm_check(lua_State *L, int idx);
const char *cl_vm_state_name(int s);
char *cl_vm_dupstr(const char *s);
void cl_vm_changed(vm *v);
void cl_vm_poll_in(vm *v, unsigned ms);
/* Spawns the VMM: the one place a VMM process is started. fds[i] becomes fd 3+i in the child;
 * stdout and stderr go to the VM's log. Returns 0 or an errno with a message in err. */
int cl_vm_spawn(lua_State *L, vm *v, char *const argv[], const int *fds, int nfds, char *err,
                size_t errlen);
/* Fills the jail options table at jt: what a VMM needs, then what the caller asked for. */
void cl_vm_jail_options(lua_State *L, vm *v, int jt, const char *program);
/* Pushes nil, "vm <id>: <message>[; VMM log: <tail>]", code; kills the VMM when fatal. */
int cl_vm_fail(lua_State *L, vm *v, int fatal, int with_log, int code, const char *fmt, ...);
void cl_vm_audit(vm *v, lua_State *L, const char *kind, int detail);
/* Pushes the fields every vm.* event has. */
void cl_vm_push_detail(lua_State *L, vm *v);
/* A snapshot in v->op_path is complete: records vm.snapshot and returns its result
 * {dir, backend, bytes} (bytes: the size of memfile, the guest memory). */
int cl_vm_snapshot_done(lua_State *L, vm *v, const char *backend, const char *memfile);
void cl_vm_kill(vm *v);
/* Reads the last n bytes of the log into buf (NUL-terminated, trimmed). */
void cl_vm_log_tail(vm *v, char *buf, size_t n);
void cl_vm_free_config(vm *v);
/* Releases everything the handle owns (idempotent). */
void cl_vm_release(lua_State *L, vm *v);

/* host.c */
int cl_vm_tsc_khz(void);
int cl_vm_tap_create(const char *name, int persist, int *fdp);
void cl_vm_tap_delete(const char *name);
int cl_vm_iface_exists(const char *name);
int cl_vm_make_rundir(vm *v);
void cl_vm_remove_rundir(vm *v, int keep_log);
/* Caches whether a guest booted under KVM with this host kernel, QEMU and guest kernel. */
void cl_vm_record_kvm_verdict(vm *v, int boots);
/* Picks the backend and accelerator (v->backend, v->kvm, v->why); 0 or an errno. */
int cl_vm_choose_backend(vm *v, int want, int accel);
long cl_vm_host_mem_mib(void);
void cl_vm_random_hex(char *out, size_t nbytes);

/* qemu.c */
int cl_qemu_step(lua_State *L, vm *v, cl_wait *w, int op);
void cl_qemu_release(vm *v);
int cl_qemu_command(vm *v, const char *execute, const char *args_json, int pass_fd);

/* firecracker.c */
int cl_fc_step(lua_State *L, vm *v, cl_wait *w, int op);
void cl_fc_release(vm *v);
void cl_fc_release_api(vm *v); /* aborts the API call in flight */

/* channel.c */
/* The shutdown operation, shared by both drivers: the agent powers the guest off, else
 * ask_vmm asks the VMM to (ACPI power button, Ctrl-Alt-Del); after the timeout, SIGKILL. */
int cl_shutdown_step(lua_State *L, vm *v, cl_wait *w, int (*ask_vmm)(vm *v));
void cl_chan_init(vm_chan *c);
int cl_chan_attach(vm *v, int fd); /* takes the fd; returns 0 or errno */
void cl_chan_close(vm *v, const char *why);
void cl_chan_release(vm *v);
int cl_chan_send(vm *v, uint16_t type, uint32_t id, const void *payload, size_t len);
int cl_chan_open_methods(
    lua_State *L); /* adds exec, write_file, read_file, ping to the table on top */
/* The module of require "clawlua.vm_faults": test seams (fail_output_allocs(n)). */
int cl_chan_open_faults(lua_State *L);
int cl_chan_busy(vm *v);
/* Asks a connected agent that will not say READY by itself (a restored guest) to answer. */
void cl_chan_probe(vm *v);
/* Asks the agent to power the guest off or reboot it; ENOTCONN when it cannot be asked. */
int cl_chan_request_poweroff(vm *v, int reboot);

#endif
