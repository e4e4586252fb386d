/*
 * The QEMU driver: `qemu-system-x86_64 -M microvm -nodefaults -no-user-config`, booting the
 * kernel (an uncompressed vmlinux boots through PVH, twice as fast under TCG as a bzImage) with
 * virtio-mmio devices: the agent channel (a named virtio-serial port, or vhost-vsock where the
 * host has it), virtio-net on the VM's tap (vhost=off), virtio-blk for a disk.
 *
 * Every socket the VMM uses is one end of a socketpair made here and passed as an inherited fd
 * (`-chardev socket,fd=N`, `-netdev tap,fd=N`): no socket paths to collide between VMs or to
 * leave behind, and the channel is connected before the guest boots. QMP runs on such a socket,
 * parsed with cJSON on the loop. QEMU's own seccomp sandbox (-sandbox on, with spawn, privilege
 * changes, obsolete and resource-control calls denied) is always in force.
 *
 * Snapshots are migration streams written to a file: `getfd` hands QEMU the open file over QMP
 * (SCM_RIGHTS), `migrate fd:` writes the stream (the device state and all of guest memory),
 * `query-migrate` is polled until it completes. A restore starts a new QEMU with
 * `-incoming fd:N` on that file and `-S`, then `cont`. savevm is not used: it needs a qcow2 disk.
 */
#include "vm.h"

#include "input.h"

#include "../guest/proto.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

void cl_qemu_release(vm *v) {
  if (v->vwatch.active) cl_watch_stop(&v->vwatch);
  if (v->vsock_fd >= 0) close(v->vsock_fd);
  v->vsock_fd = -1;
  if (v->qwatch.active) cl_watch_stop(&v->qwatch);
  if (v->qmpfd >= 0) close(v->qmpfd);
  v->qmpfd = -1;
  free(v->qin);
  v->qin = NULL;
  v->qin_len = 0;
  v->qin_skip = 0;
  free(v->qmp_reply);
  v->qmp_reply = NULL;
  v->qmp_ready = v->qmp_greeted = 0;
}

static void qmp_store_reply(vm *v, cJSON *value, int is_error) {
  free(v->qmp_reply);
  v->qmp_reply = NULL;
  if (is_error) {
    cJSON *desc = cJSON_GetObjectItemCaseSensitive(value, "desc");
    v->qmp_reply = strdup(desc && cJSON_IsString(desc) ? desc->valuestring : "unknown QMP error");
  } else {
    v->qmp_reply = cJSON_PrintUnformatted(value);
  }
  v->qmp_error = is_error;
  v->qmp_have_reply = 1;
}

static void qmp_message(vm *v, const char *line) {
  cJSON *j = cJSON_Parse(line);
  if (!j) return; /* QEMU talks JSON; a partial line cannot reach here */
  if (cJSON_GetObjectItemCaseSensitive(j, "QMP")) {
    v->qmp_greeted = 1;
    cl_qemu_command(v, "qmp_capabilities", NULL, -1);
    v->qmp_wait_id = 0; /* the capabilities answer makes QMP ready */
  } else {
    cJSON *id = cJSON_GetObjectItemCaseSensitive(j, "id");
    cJSON *ret = cJSON_GetObjectItemCaseSensitive(j, "return");
    cJSON *err = cJSON_GetObjectItemCaseSensitive(j, "error");
    cJSON *ev = cJSON_GetObjectItemCaseSensitive(j, "event");
    /* ids are the integers we sent: anything else (1e300, 2.5, -1) answers nothing of ours */
    double d = cJSON_IsNumber(id) ? id->valuedouble : -1;
    long n = d >= 1 && d <= 1e15 && d == (double)(long)d ? (long)d : 0;
    if (n > 0 && (ret || err)) {
      if (n == 1 && !v->qmp_ready) {
        v->qmp_ready = 1; /* id 1 is always qmp_capabilities */
      } else if (n == v->qmp_wait_id) {
        qmp_store_reply(v, err ? err : ret, err != NULL);
      }
    } else if (cJSON_IsString(ev)) {
      const char *name = ev->valuestring;
      if (strcmp(name, "SHUTDOWN") == 0 || strcmp(name, "POWERDOWN") == 0 ||
          strcmp(name, "RESET") == 0) {
        lua_State *L = v->L;
        int stopped = lua_gc(L, LUA_GCISRUNNING);
        if (stopped) lua_gc(L, LUA_GCSTOP);
        lua_createtable(L, 0, 2);
        lua_pushstring(L, name);
        lua_setfield(L, -2, "event");
        cJSON *data = cJSON_GetObjectItemCaseSensitive(j, "data");
        cJSON *reason = data ? cJSON_GetObjectItemCaseSensitive(data, "reason") : NULL;
        if (reason && cJSON_IsString(reason)) {
          lua_pushstring(L, reason->valuestring);
          lua_setfield(L, -2, "reason");
        }
        cl_audit_emit(L, "vm.qmp_event", v->id, v->pid > 0 ? v->pid : 0, lua_gettop(L));
        lua_pop(L, 1);
        if (stopped) lua_gc(L, LUA_GCRESTART);
      }
    }
  }
  cJSON_Delete(j);
  cl_vm_changed(v);
}

static void on_qmp(cl_watch *w, uint32_t events) {
  vm *v = w->data;
  for (;;) {
    if (v->qmpfd < 0) return;
    ssize_t n = read(v->qmpfd, v->qin + v->qin_len, QMP_IN_CAP - v->qin_len - 1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) { /* QEMU is going away; its exit is reported by the pidfd */
      cl_watch_stop(&v->qwatch);
      close(v->qmpfd);
      v->qmpfd = -1;
      cl_vm_changed(v);
      return;
    }
    cl_qmp_input(v, (size_t)n);
  }
}

void cl_qmp_input(vm *v, size_t n) {
  v->qin_len += n;
  v->qin[v->qin_len] = 0;
  char *start = v->qin, *nl;
  while ((nl = memchr(start, '\n', v->qin_len - (size_t)(start - v->qin)))) {
    *nl = 0;
    if (v->qin_skip) /* the end of a message too long to keep */
      v->qin_skip = 0;
    else if (nl > start)
      qmp_message(v, start);
    start = nl + 1;
  }
  v->qin_len -= (size_t)(start - v->qin);
  memmove(v->qin, start, v->qin_len);
  if (v->qin_len == QMP_IN_CAP - 1) { /* one message of 1 MiB or more: not one we asked for */
    v->qin_len = 0;
    v->qin_skip = 1; /* its rest, up to the newline, is dropped too */
  }
}

/* Sends a QMP command (with fd passed along when pass_fd >= 0); its answer will be in
 * v->qmp_reply once v->qmp_have_reply is set. */
int cl_qemu_command(vm *v, const char *execute, const char *args_json, int pass_fd) {
  if (v->qmpfd < 0) return EPIPE;
  long id = ++v->qmp_next_id;
  char buf[4096];
  int n = snprintf(buf, sizeof buf, "{\"execute\":\"%s\"%s%s,\"id\":%ld}\n", execute,
                   args_json ? ",\"arguments\":" : "", args_json ? args_json : "", id);
  if (n < 0 || (size_t)n >= sizeof buf) return E2BIG;
  v->qmp_wait_id = id;
  v->qmp_have_reply = 0;
  struct iovec iov = {buf, (size_t)n};
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  union {
    char b[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } ctl;
  if (pass_fd >= 0) {
    memset(&ctl, 0, sizeof ctl);
    msg.msg_control = ctl.b;
    msg.msg_controllen = sizeof ctl.b;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  /* Commands are small and QEMU reads them promptly: a full socket buffer here means QEMU
   * stopped reading, which the caller's deadline will report. */
  ssize_t w;
  do w = sendmsg(v->qmpfd, &msg, MSG_NOSIGNAL);
  while (w < 0 && errno == EINTR);
  if (w < 0) return errno;
  if (w != n) return EAGAIN;
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Starting                                                                                   */

typedef struct argvb {
  char *v[96];
  char store[8192];
  size_t used;
  int n;
} argvb;

static void arg(argvb *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void arg(argvb *a, const char *fmt, ...) {
  if (a->n >= (int)CL_ARRAY_LEN(a->v) - 1) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(a->store + a->used, sizeof a->store - a->used, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof a->store - a->used) return;
  a->v[a->n++] = a->store + a->used;
  a->v[a->n] = NULL;
  a->used += (size_t)n + 1;
}

/* Commas in a QEMU option value are doubled. */
static const char *qesc(const char *s, char *buf, size_t n) {
  size_t j = 0;
  for (; *s && j + 2 < n; s++) {
    if (*s == ',') buf[j++] = ',';
    buf[j++] = *s;
  }
  buf[j] = 0;
  return buf;
}

/* QEMU's command line: the machine, the kernel and its arguments, and the devices; the fds it
 * inherits (QMP, the agent's socket, the tap, a migration stream) are added to fds. */
static void qemu_args(vm *v, argvb *a, int *fds, int *nfds, int qmp_fd, int agent_fd) {
  char e1[1200];
  if (v->vmm)
    for (char **p = v->vmm; *p; p++) arg(a, "%s", *p);
  else
    arg(a, "qemu-system-x86_64");
  arg(a, "-name");
  arg(a, "%s", v->id);
  /* A kernel without ACPI finds the virtio-mmio devices on its command line: with acpi=off,
   * microvm's auto-kernel-cmdline appends a virtio_mmio.device= for each. */
  arg(a, "-M");
  arg(a, "%s", v->no_acpi ? "microvm,acpi=off" : "microvm");
  arg(a, "-nodefaults");
  arg(a, "-no-user-config");
  arg(a, "-display");
  arg(a, "none");
  arg(a, "-accel");
  arg(a, "%s", v->kvm ? "kvm" : "tcg");
  if (!v->kvm) {
    arg(a, "-cpu");
    arg(a, "max");
  }
  arg(a, "-m");
  arg(a, "%d", v->mem_mib);
  arg(a, "-smp");
  arg(a, "%d", v->vcpus);
  arg(a, "-no-reboot");
  if (!v->seccomp_file) { /* seccomp = false turns QEMU's own sandbox off (audited: vm.spawn) */
    arg(a, "-sandbox");
    arg(a, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
  }
  arg(a, "-kernel");
  arg(a, "%s", v->kernel);
  if (v->initrd) {
    arg(a, "-initrd");
    arg(a, "%s", v->initrd);
  }
  int khz = cl_vm_tsc_khz();
  char tsc[64] = "";
  if (khz > 0) snprintf(tsc, sizeof tsc, " tsc_early_khz=%d tsc=reliable", khz);
  arg(a, "-append");
  /* Without ACPI a reset is a triple fault (reboot=t), which -no-reboot turns into an exit;
   * such a kernel has no PCI either (an unknown pci= would reach /init as an environment). */
  arg(a, "console=ttyS0 quiet panic=1 %s%s clawlua.channel=%s%s%s%s",
      v->no_acpi ? "reboot=t" : "pci=off reboot=k", tsc,
      v->channel == CH_VSOCK ? "vsock" : "serial", v->rootfs ? " clawlua.root=/dev/vda" : "",
      v->boot_args ? " " : "", v->boot_args ? v->boot_args : "");
  arg(a, "-chardev");
  arg(a, "stdio,id=con,signal=off");
  arg(a, "-serial");
  arg(a, "chardev:con");
  fds[(*nfds)++] = qmp_fd;
  arg(a, "-chardev");
  arg(a, "socket,id=qmp,fd=%d", 2 + *nfds);
  arg(a, "-mon");
  arg(a, "chardev=qmp,mode=control");
  if (v->channel == CH_SERIAL) {
    fds[(*nfds)++] = agent_fd;
    arg(a, "-device");
    arg(a, "virtio-serial-device");
    arg(a, "-chardev");
    arg(a, "socket,id=agent,fd=%d", 2 + *nfds);
    arg(a, "-device");
    arg(a, "virtserialport,chardev=agent,name=%s", CLA_PORT_NAME);
  } else if (v->channel == CH_VSOCK) {
    arg(a, "-device");
    arg(a, "vhost-vsock-device,guest-cid=%d", v->cid);
  }
  if (v->tapfd >= 0) {
    fds[(*nfds)++] = v->tapfd;
    arg(a, "-netdev");
    arg(a, "tap,id=net0,fd=%d,vhost=off", 2 + *nfds);
    arg(a, "-device");
    arg(a, "virtio-net-device,netdev=net0,mac=%s", v->mac);
  }
  if (v->rootfs) {
    arg(a, "-drive");
    arg(a, "id=root,file=%s,format=raw,if=none%s", qesc(v->rootfs, e1, sizeof e1),
        v->rootfs_ro ? ",readonly=on" : "");
    arg(a, "-device");
    arg(a, "virtio-blk-device,drive=root");
  }
  if (v->snapshot_fd >= 0) {
    fds[(*nfds)++] = v->snapshot_fd;
    arg(a, "-incoming");
    arg(a, "fd:%d", 2 + *nfds);
    arg(a, "-S");
  }
}

static int spawn_qemu(lua_State *L, vm *v, char *err, size_t errlen) {
  int qsv[2] = {-1, -1}, csv[2] = {-1, -1};
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, qsv) < 0) {
    snprintf(err, errlen, "socketpair: %s", strerror(errno));
    return errno;
  }
  if (v->channel == CH_SERIAL && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, csv) < 0) {
    int e = errno;
    close(qsv[0]);
    close(qsv[1]);
    snprintf(err, errlen, "socketpair: %s", strerror(e));
    return e;
  }
  int fds[VM_MAX_FDS], nfds = 0;
  argvb *a = calloc(1, sizeof *a);
  if (!a) {
    close(qsv[0]);
    close(qsv[1]);
    if (csv[0] >= 0) close(csv[0]), close(csv[1]);
    snprintf(err, errlen, "out of memory");
    return ENOMEM;
  }
  qemu_args(v, a, fds, &nfds, qsv[1], csv[1]);
  int e = cl_vm_spawn(L, v, a->v, fds, nfds, err, errlen);
  free(a);
  close(qsv[1]);
  if (csv[1] >= 0) close(csv[1]);
  if (v->snapshot_fd >= 0) {
    close(v->snapshot_fd);
    v->snapshot_fd = -1;
  }
  if (e) {
    close(qsv[0]);
    if (csv[0] >= 0) close(csv[0]);
    return e;
  }
  v->qmpfd = qsv[0];
  cl_set_nonblock(v->qmpfd, 1);
  v->qin = malloc(QMP_IN_CAP);
  v->qmp_next_id = 0;
  v->qmp_greeted = v->qmp_ready = 0;
  if (!v->qin || cl_watch_start(v->loop, &v->qwatch, v->qmpfd, EPOLLIN, on_qmp) != 0) {
    if (csv[0] >= 0) close(csv[0]);
    snprintf(err, errlen, "cannot watch the QMP socket");
    return ENOMEM;
  }
  v->qwatch.data = v;
  if (csv[0] >= 0 && (e = cl_chan_attach(v, csv[0])) != 0) {
    snprintf(err, errlen, "agent channel: %s", strerror(e));
    return e;
  }
  return 0;
}

/* vhost-vsock: the host connects to the guest agent's port; until the agent listens the
 * connection is reset, and it is tried again. Returns 1 once the channel is attached. */
static void on_vsock_connect(cl_watch *w, uint32_t events) {
  vm *v = w->data;
  cl_watch_stop(&v->vwatch);
  v->vsock_len = 1; /* the connect finished, one way or the other */
  cl_vm_changed(v);
}

static int vsock_connect(vm *v) {
  if (v->vsock_fd >= 0 && !v->vsock_len) return 0; /* in progress */
  if (v->vsock_fd >= 0) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(v->vsock_fd, SOL_SOCKET, SO_ERROR, &err, &len);
    int fd = v->vsock_fd;
    v->vsock_fd = -1;
    if (!err) return cl_chan_attach(v, fd) == 0;
    close(fd);
    cl_vm_poll_in(v, 20);
    return 0;
  }
  int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return 0;
  struct sockaddr_vm a;
  memset(&a, 0, sizeof a);
  a.svm_family = AF_VSOCK;
  a.svm_cid = (unsigned)v->cid;
  a.svm_port = CLA_VSOCK_PORT;
  if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return cl_chan_attach(v, fd) == 0;
  if (errno != EINPROGRESS ||
      cl_watch_start(v->loop, &v->vwatch, fd, EPOLLOUT, on_vsock_connect) != 0) {
    close(fd);
    cl_vm_poll_in(v, 20);
    return 0;
  }
  v->vwatch.data = v;
  v->vsock_fd = fd;
  v->vsock_len = 0;
  return 0;
}

static int write_meta(vm *v, char *err, size_t errlen) {
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "backend", "qemu");
  cJSON_AddStringToObject(j, "format", "qemu migration stream (migrate fd:)");
  cJSON_AddStringToObject(j, "kernel", v->kernel);
  if (v->initrd) cJSON_AddStringToObject(j, "initrd", v->initrd);
  if (v->rootfs) cJSON_AddStringToObject(j, "rootfs", v->rootfs);
  if (v->boot_args) cJSON_AddStringToObject(j, "boot_args", v->boot_args);
  cJSON_AddNumberToObject(j, "vcpus", v->vcpus);
  cJSON_AddNumberToObject(j, "mem_mib", v->mem_mib);
  cJSON_AddNumberToObject(j, "rootfs_readonly", v->rootfs_ro);
  cJSON_AddNumberToObject(j, "acpi", !v->no_acpi);
  cJSON_AddNumberToObject(j, "kvm", v->kvm == 1);
  cJSON_AddNumberToObject(j, "cid", v->cid);
  cJSON_AddStringToObject(j, "channel",
                          v->channel == CH_VSOCK  ? "vsock"
                          : v->channel == CH_NONE ? "none"
                                                  : "virtio-serial");
  if (v->tap[0]) {
    cJSON_AddStringToObject(j, "tap", v->tap);
    cJSON_AddStringToObject(j, "mac", v->mac);
  }
  cJSON_AddStringToObject(j, "source_id", v->id);
  char *s = cJSON_Print(j);
  cJSON_Delete(j);
  if (!s) {
    snprintf(err, errlen, "out of memory");
    return ENOMEM;
  }
  char p[600];
  snprintf(p, sizeof p, "%s/vm.json", v->op_path);
  FILE *f = fopen(p, "we");
  int e = 0;
  if (!f || fputs(s, f) < 0) e = errno ? errno : EIO;
  if (f && fclose(f) != 0 && !e) e = errno;
  free(s);
  if (e) snprintf(err, errlen, "%.300s: %s", p, strerror(e));
  return e;
}

static const char *reply_field(vm *v, const char *key, char *out, size_t n) {
  out[0] = 0;
  cJSON *j = v->qmp_reply ? cJSON_Parse(v->qmp_reply) : NULL;
  cJSON *x = j ? cJSON_GetObjectItemCaseSensitive(j, key) : NULL;
  if (x && cJSON_IsString(x)) snprintf(out, n, "%s", x->valuestring);
  cJSON_Delete(j);
  return out;
}

static void audit_state(lua_State *L, vm *v, const char *kind) {
  lua_createtable(L, 0, 2);
  lua_pushstring(L, cl_vm_state_name(v->state));
  lua_setfield(L, -2, "state");
  cl_vm_audit(v, L, kind, lua_gettop(L));
  lua_pop(L, 1);
}

/* Waits for the answer to the last command: VM_WAIT, 1 (answer in qmp_reply) or a pushed
 * failure (3). */
static int await_reply(lua_State *L, vm *v, cl_wait *w, const char *what) {
  if (v->qmp_have_reply) {
    if (v->qmp_error) return cl_vm_fail(L, v, 0, 0, EIO, "%s: QEMU says: %s", what, v->qmp_reply);
    return 1;
  }
  if (v->exited) return cl_vm_fail(L, v, 1, 1, ECHILD, "%s: the VMM exited", what);
  if (v->qmpfd < 0) return cl_vm_fail(L, v, 1, 1, EPIPE, "%s: QMP connection lost", what);
  if (w->state == CL_WAIT_TIMEOUT)
    return cl_vm_fail(L, v, 0, 0, ETIMEDOUT, "%s: no answer from QEMU", what);
  return VM_WAIT;
}

/* The first step of a start: the VMM spawned (a restore's migration stream opened for it),
 * vm.start recorded. Returns 0, or the failure's results. */
static int spawn_step(lua_State *L, vm *v, cl_wait *w) {
  char err[400];
  if (v->restore_dir) { /* the migration stream is inherited by the new QEMU */
    char p[600];
    snprintf(p, sizeof p, "%s/memory.qemu", v->restore_dir);
    v->snapshot_fd = open(p, O_RDONLY | O_CLOEXEC);
    if (v->snapshot_fd < 0)
      return cl_vm_fail(L, v, 1, 0, errno, "restore: %s: %s", p, strerror(errno));
  }
  v->state = VS_STARTING;
  int e = spawn_qemu(L, v, err, sizeof err);
  if (e) return cl_vm_fail(L, v, 1, 1, e, "start: %s", err);
  w->deadline = cl_deadline(v->kvm == 2 && v->ready_timeout > 20 ? 20.0 : v->ready_timeout);
  lua_createtable(L, 0, 3);
  lua_pushstring(L, v->why);
  lua_setfield(L, -2, "why");
  lua_pushstring(L, v->kvm ? "kvm" : "tcg");
  lua_setfield(L, -2, "accel");
  if (v->restore_dir) {
    lua_pushstring(L, v->restore_dir);
    lua_setfield(L, -2, "restore");
  }
  cl_vm_audit(v, L, "vm.start", lua_gettop(L));
  lua_pop(L, 1);
  return 0;
}

/* The agent said READY: the VM runs (a probe boot proved KVM), vm.ready recorded. */
static int report_ready(lua_State *L, vm *v) {
  if (v->kvm == 2) {
    v->kvm = 1;
    cl_vm_record_kvm_verdict(v, 1);
    snprintf(v->why, sizeof v->why, "qemu with KVM (a probe boot under KVM reached the agent)");
  }
  v->state = VS_RUNNING;
  v->t_ready = cl_now_ns();
  lua_createtable(L, 0, 3);
  lua_pushnumber(L, (double)(v->t_ready - v->t_spawn) / 1e9);
  lua_setfield(L, -2, "boot_seconds");
  if (v->chan.uname[0]) {
    lua_pushstring(L, v->chan.uname);
    lua_setfield(L, -2, "uname");
  }
  cl_vm_audit(v, L, "vm.ready", lua_gettop(L));
  lua_pop(L, 1);
  lua_pushvalue(L, 1);
  return 1;
}

static int start_step(lua_State *L, vm *v, cl_wait *w) {
  int r;
  /* A misbehaving agent is the news, even when its VMM went away afterwards. */
  if (w->aux[0] > 0 && v->chan.closed && strstr(v->chan.error, "protocol violation"))
    return cl_vm_fail(L, v, 1, 1, EPROTO, "start: %s", v->chan.error);
  switch (w->aux[0]) {
  case 0: {
    int n = spawn_step(L, v, w);
    if (n) return n;
    w->aux[0] = 1;
  }
  /* fall through */
  case 1: {
    if (v->exited) goto vmm_gone;
    if (!v->qmp_ready) {
      if (w->state == CL_WAIT_TIMEOUT) goto timeout;
      return VM_WAIT;
    }
    if (!v->restore_dir) {
      w->aux[0] = 5;
      return start_step(L, v, w);
    }
    cl_qemu_command(v, "query-status", NULL, -1);
    w->aux[0] = 2;
  }
  /* fall through */
  case 2: { /* restore: until the incoming migration is loaded */
    r = await_reply(L, v, w, "restore");
    if (r != 1) return r;
    char status[32];
    reply_field(v, "status", status, sizeof status);
    if (strcmp(status, "inmigrate") == 0) {
      w->aux[0] = 3;
      cl_vm_poll_in(v, 20);
      return VM_WAIT;
    }
    if (strcmp(status, "paused") != 0 && strcmp(status, "prelaunch") != 0 &&
        strcmp(status, "postmigrate") != 0)
      return cl_vm_fail(L, v, 1, 1, EIO, "restore: QEMU is %s after loading the snapshot", status);
    cl_qemu_command(v, "cont", NULL, -1);
    w->aux[0] = 4;
    return VM_WAIT;
  }
  case 3: {
    if (v->exited) goto vmm_gone;
    cl_qemu_command(v, "query-status", NULL, -1);
    w->aux[0] = 2;
    return VM_WAIT;
  }
  case 4: {
    r = await_reply(L, v, w, "restore");
    if (r != 1) return r;
    /* The agent does not know it was restored: it is asked, and its answer means ready. */
    if (v->channel == CH_SERIAL) cl_chan_probe(v);
    w->aux[0] = 5;
  }
  /* fall through */
  case 5: {
    if (v->exited) goto vmm_gone;
    if (v->channel == CH_VSOCK && v->chan.closed && !v->chan.error[0]) vsock_connect(v);
    if (v->channel != CH_NONE && !v->chan.ready) {
      if (w->state == CL_WAIT_TIMEOUT) {
        if (v->kvm && v->kvm_auto) goto kvm_failed;
        if (v->chan.closed && v->chan.error[0])
          return cl_vm_fail(L, v, 1, 1, EPIPE, "start: the agent channel closed: %s",
                            v->chan.error);
        goto timeout;
      }
      /* A channel that closed by itself means QEMU is going: its exit is the better news. */
      return VM_WAIT;
    }
    return report_ready(L, v);
  }
  default:
    return cl_vm_fail(L, v, 1, 0, EINVAL, "start: bad step");
  }
vmm_gone:
  if (v->kvm && v->kvm_auto) goto kvm_failed;
  return cl_vm_fail(L, v, 1, 1, ECHILD, "start: the VMM %s during start",
                    v->exit_signal ? "was killed" : "exited");
timeout:
  if (v->kvm && v->kvm_auto) goto kvm_failed;
  return cl_vm_fail(L, v, 1, 1, ETIMEDOUT, "start: the guest agent was not ready after %.0f s",
                    v->ready_timeout);
kvm_failed:
  /* KVM was chosen, not asked for, and this kernel does not boot under it (a nested PVM
   * hypervisor, say): remember, and boot again under TCG in the same start. */
  if (!v->probe_recorded) {
    v->probe_recorded = 1;
    cl_vm_record_kvm_verdict(v, 0);
    cl_vm_kill(v);
  }
  if (!v->exited) return VM_WAIT; /* back here once the KVM VMM is gone */
  v->kvm = 0;
  snprintf(v->why, sizeof v->why,
           "qemu with TCG (/dev/kvm exists but a boot under it failed: this KVM does not run "
           "this kernel)");
  w->aux[0] = 0;
  w->state = CL_WAIT_DONE;
  return start_step(L, v, w);
}

static int simple_step(lua_State *L, vm *v, cl_wait *w, const char *cmd, const char *what,
                       int new_state, const char *kind) {
  if (w->aux[0] == 0) {
    int e = cl_qemu_command(v, cmd, NULL, -1);
    if (e) return cl_vm_fail(L, v, 0, 0, e, "%s: %s", what, strerror(e));
    w->aux[0] = 1;
  }
  int r = await_reply(L, v, w, what);
  if (r != 1) return r;
  v->state = new_state;
  audit_state(L, v, kind);
  lua_pushboolean(L, 1);
  return 1;
}

static int snapshot_step(lua_State *L, vm *v, cl_wait *w) {
  char err[400];
  int r;
  switch (w->aux[0]) {
  case 0: {
    v->was_running = v->state == VS_RUNNING;
    if (v->was_running) {
      cl_qemu_command(v, "stop", NULL, -1);
      w->aux[0] = 1;
      return VM_WAIT;
    }
    w->aux[0] = 2;
    return snapshot_step(L, v, w);
  }
  case 1: {
    r = await_reply(L, v, w, "snapshot: stop");
    if (r != 1) return r;
    v->state = VS_PAUSED;
    w->aux[0] = 2;
  }
  /* fall through */
  case 2: {
    char p[600];
    snprintf(p, sizeof p, "%s/memory.qemu", v->op_path);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return cl_vm_fail(L, v, 0, 0, errno, "snapshot: %s: %s", p, strerror(errno));
    int e = cl_qemu_command(v, "getfd", "{\"fdname\":\"clawlua-snapshot\"}", fd);
    close(fd); /* QEMU has its own copy now */
    if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: getfd: %s", strerror(e));
    w->aux[0] = 3;
    return VM_WAIT;
  }
  case 3: {
    r = await_reply(L, v, w, "snapshot: getfd");
    if (r != 1) return r;
    cl_qemu_command(v, "migrate", "{\"uri\":\"fd:clawlua-snapshot\"}", -1);
    w->aux[0] = 4;
    return VM_WAIT;
  }
  case 4: {
    r = await_reply(L, v, w, "snapshot: migrate");
    if (r != 1) return r;
    w->aux[0] = 5;
  }
  /* fall through */
  case 5: {
    cl_qemu_command(v, "query-migrate", NULL, -1);
    w->aux[0] = 6;
    return VM_WAIT;
  }
  case 6: {
    r = await_reply(L, v, w, "snapshot: query-migrate");
    if (r != 1) return r;
    char status[32];
    reply_field(v, "status", status, sizeof status);
    if (strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0) {
      char detail[200];
      reply_field(v, "error-desc", detail, sizeof detail);
      return cl_vm_fail(L, v, 0, 0, EIO, "snapshot: migration %s%s%s", status,
                        detail[0] ? ": " : "", detail);
    }
    if (strcmp(status, "completed") != 0) {
      w->aux[0] = 5;
      cl_vm_poll_in(v, 20);
      return VM_WAIT;
    }
    int e = write_meta(v, err, sizeof err);
    if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: %s", err);
    if (v->was_running) {
      cl_qemu_command(v, "cont", NULL, -1);
      w->aux[0] = 7;
      return VM_WAIT;
    }
    w->aux[0] = 8;
    return snapshot_step(L, v, w);
  }
  case 7: {
    r = await_reply(L, v, w, "snapshot: cont");
    if (r != 1) return r;
    v->state = VS_RUNNING;
    w->aux[0] = 8;
  }
  /* fall through */
  case 8:
    return cl_vm_snapshot_done(L, v, "qemu", "memory.qemu");
  default:
    return cl_vm_fail(L, v, 0, 0, EINVAL, "snapshot: bad step");
  }
}

static int ask_powerdown(vm *v) {
  return cl_qemu_command(v, "system_powerdown", NULL, -1);
}

int cl_qemu_step(lua_State *L, vm *v, cl_wait *w, int op) {
  switch (op) {
  case OP_START:
    return start_step(L, v, w);
  case OP_PAUSE:
    return simple_step(L, v, w, "stop", "pause", VS_PAUSED, "vm.pause");
  case OP_RESUME:
    return simple_step(L, v, w, "cont", "resume", VS_RUNNING, "vm.resume");
  case OP_SNAPSHOT:
    return snapshot_step(L, v, w);
  case OP_SHUTDOWN:
    return cl_shutdown_step(L, v, w, ask_powerdown);
  default:
    return cl_vm_fail(L, v, 0, 0, EINVAL, "unknown operation");
  }
}
