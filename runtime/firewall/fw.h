/*
 * Private header of the firewall primitive (the files of runtime/firewall); what these files
 * share stays here rather than in clawlua.h, which is for what other primitives use.
 *
 * One-way flow (a file calls only files below it; the one upward need, nflog.c naming the VM of
 * a drop, goes through the fw.vm_id_of function pointer the handle sets):
 *
 *   firewall.c   Lua binding: firewall.open, the handle (close, destroy, list, counters, stats)
 *   ops.c        Lua binding: fw:attach/update/attach_many/detach/detach_many/reconcile
 *     |
 *   txn.c        a transaction run from a Lua call; applies the kernel's answer to the registry
 *   spec.c       a Lua spec table validated into a fw_plan
 *   vms.c        the registry of VMs and their sets; DNS refresh of their domain names
 *     |
 *   ruleset_vm.c a VM's chains and rules from its plan
 *   ruleset.c    names, nf_tables expressions and messages, sets, the base ruleset (libnftnl)
 *     |
 *   netlink.c    nf_tables batches and dumps over netlink     } kernel- and network-facing
 *   nflog.c      the drop log (NFLOG group)                   }
 *   dns.c        the stub resolver (and fw:resolve)           }
 */
#ifndef CLAWLUA_FW_H
#define CLAWLUA_FW_H

#include "clawlua.h"

#include <linux/netlink.h>
#include <net/if.h>
#include <stdint.h>

#define FW_MT            "clawlua.firewall"
#define FW_ID_MAX        128  /* bytes of a VM id (kept in the chain comment, <= 255) */
#define FW_NAME_MAX      96   /* chain/set names we build (nftables allows 256) */
#define FW_BASE_MAX      48   /* vm_<prefix>_<hash>: at most 40 bytes */
#define FW_HASH_HEX      20   /* 80 bits of SHA-256 in every per-VM name */
#define FW_PREFIX_MAX    16   /* sanitised id prefix in names, for humans reading nft output */
#define FW_MAX_ADDRS     4096 /* addresses (CIDRs) per VM spec, all entries together */
#define FW_MAX_ENTRIES   512  /* allow/deny entries per direction */
#define FW_MAX_HOSTS     64   /* domain names per VM */
#define FW_MAX_RESOLVED  64   /* addresses kept per resolved domain name */
#define FW_INLINE_MAX    8    /* CIDRs per entry and family matched inline, not in a set */
#define FW_METADATA_ADDR "169.254.169.254"

enum { FW_EGRESS = 0, FW_INGRESS = 1 };
enum { FW_ALLOW = 0, FW_DENY = 1, FW_DNS = 2 };
/* Protocol bits of an entry; 0 means any protocol. */
enum { FW_P_TCP = 1, FW_P_UDP = 2, FW_P_ICMP = 4 };

typedef struct fw_addr {
  uint8_t fam;  /* 4 or 6 */
  uint8_t plen; /* prefix length */
  uint8_t a[16];
} fw_addr;

typedef struct fw_host {
  char *name;
  fw_addr *addrs; /* current addresses (/32, /128) */
  size_t naddrs;
  uint32_t ttl;
  int resolved; /* at least one answer was received */
  char err[96]; /* last failure */
} fw_host;

/* One allow/deny entry (or the DNS resolvers) of a direction, in spec order. */
typedef struct fw_entry {
  uint8_t dir, action, proto;
  uint16_t pfrom, pto; /* destination port range; 0/0: any */
  int index;           /* position in the spec list (1-based) */
  int any;             /* no address restriction */
  int metadata;        /* names 169.254.169.254/32 exactly: placed before the metadata drop */
  fw_addr *addrs;      /* static CIDRs */
  size_t naddrs;
  fw_host *hosts; /* domain names, resolved on the loop */
  size_t nhosts;
  char label[40]; /* "egress.allow[3]" */
} fw_entry;

typedef struct fw_rate {
  uint64_t packets, bytes, burst;
} fw_rate;

/* A validated VM spec. */
typedef struct fw_plan {
  char iface[IFNAMSIZ];
  int has_mac, has4, has6;
  uint8_t mac[6];
  fw_addr ip4, ip6;
  int accept[2]; /* policy per direction: 1 accept, 0 drop */
  fw_rate rate[2];
  fw_entry *entries;
  size_t nentries;
  int log;                      /* log drops to the NFLOG group */
  uint32_t log_rate, log_burst; /* log at most this many per second per rule (0: all) */
} fw_plan;

/* A VM known to the firewall: attached by this handle or adopted from the kernel. */
typedef struct fw_vm {
  struct fw_vm *next_key, *next_if;
  char *id;
  char key[FW_HASH_HEX + 1];
  char base[FW_BASE_MAX];
  char iface[IFNAMSIZ];
  unsigned gen; /* generation of its set names */
  char **sets;  /* names of its sets in the kernel */
  size_t nsets;
  fw_plan *plan;              /* NULL when adopted from the kernel (the spec is not stored there) */
  struct fw_refresh *refresh; /* DNS refresh timers of its domain names */
} fw_vm;

/* Description of one message of a batch, to name the object the kernel refused. */
typedef struct fw_desc {
  uint8_t kind; /* FW_OBJ_* */
  int vm;       /* index in the transaction's id list, -1: none */
  char name[FW_NAME_MAX];
} fw_desc;
enum {
  FW_OBJ_TABLE,
  FW_OBJ_CHAIN,
  FW_OBJ_SET,
  FW_OBJ_ELEM,
  FW_OBJ_MAPELEM,
  FW_OBJ_RULE,
  FW_OBJ_FLUSH,
  FW_OBJ_DUMP,
  FW_OBJ_BATCH
};

typedef struct fw fw;
typedef struct fw_txn fw_txn;
typedef int (*fw_msg_cb)(const struct nlmsghdr *nlh, void *arg);
typedef void (*fw_done_cb)(fw *f, fw_txn *t);

/* One request to the kernel: an atomic batch, or a dump. */
struct fw_txn {
  struct fw_txn *next;
  char *buf;
  size_t len, cap;
  uint32_t seq_begin, seq0, seq_end; /* BEGIN, first message, END (acked) */
  fw_desc *desc;
  size_t ndesc, desccap;
  char **ids; /* VM ids named by descriptions */
  size_t nids, idcap;
  int is_dump, sent, done, end_acked;
  int overrun; /* some replies were lost (ENOBUFS) */
  int err;     /* first errno reported */
  char errmsg[512];
  fw_msg_cb on_msg; /* dump: each data message */
  void *arg;
  fw_done_cb on_done; /* completion, success or failure (registry updates) */
  void *ctx;
  int ctx_kind;
  cl_wait *waiter; /* Lua call waiting for completion, if any */
  int orphan;      /* nobody will read the result: free on completion */
  uint32_t set_id; /* set ids handed out in this batch */
};

typedef struct fw_nflog fw_nflog;
typedef struct fw_dns fw_dns;

struct fw {
  int closed;
  cl_loop *loop;
  lua_State *L; /* main thread: C callbacks emit audit events through it */
  char table[33];
  char netns[256];
  int nl_fd;
  uint32_t portid, seq;
  cl_watch nl_watch;
  char *rbuf;
  fw_txn *inflight, *qhead, *qtail;
  /* registry */
  fw_vm **bykey, **byif;
  size_t nbuckets, nvms;
  /* drop log */
  fw_nflog *nflog;
  /* Names the VM of a hash key (NULL: unknown): the registry's lookup, handed down to nflog.c
   * so that the kernel-facing layer calls nothing above it. */
  const char *(*vm_id_of)(fw *f, const char *key);
  int log_group; /* -1: none */
  /* DNS */
  fw_dns *dns;
  double min_ttl, max_ttl, dns_timeout;
  uint64_t batches, messages;
  uint64_t overruns; /* batches whose replies overflowed the receive buffer */
};

/* netlink.c */
int cl_fw_open_sockets(const char *netns, int *fds, const int *types, int n, char *err,
                       size_t errlen);
fw_txn *cl_fw_txn_new(int is_dump);
void cl_fw_txn_free(fw_txn *t);
int cl_fw_txn_vm(fw_txn *t, const char *id); /* index of id in t->ids (added) */
struct nlmsghdr *cl_fw_txn_msg(fw *f, fw_txn *t, uint16_t type, uint16_t family, uint16_t flags,
                               uint8_t kind, int vm, const char *name);
void cl_fw_txn_end_msg(fw_txn *t, struct nlmsghdr *nlh);
int cl_fw_txn_begin(fw *f, fw_txn *t);
int cl_fw_txn_finish(fw *f, fw_txn *t);
void cl_fw_submit(fw *f, fw_txn *t);
void cl_fw_on_readable(cl_watch *w, uint32_t events);
void cl_fw_abort_all(fw *f);
int cl_fw_nl_setup(fw *f, int fd, char *err, size_t errlen);

/* ruleset.c */
void cl_fw_vm_names(const char *id, char *key, char *base);
int cl_fw_build_base(fw *f, fw_txn *t);
int cl_fw_build_attach(fw *f, fw_txn *t, fw_vm *vm, const fw_plan *p, int replace,
                       const fw_vm *old);
int cl_fw_build_detach(fw *f, fw_txn *t, const fw_vm *vm);
int cl_fw_build_set_refresh(fw *f, fw_txn *t, const fw_vm *vm, size_t entry);
int cl_fw_build_delete_table(fw *f, fw_txn *t);
int cl_fw_dump_request(fw *f, fw_txn *t, uint16_t type, uint16_t family, const char *chain,
                       const char *set);
int cl_fw_entry_uses_set(const fw_entry *e, int fam);
char *cl_fw_set_name(const fw_vm *vm, unsigned gen, const fw_entry *e, int fam, char *out);
void cl_fw_plan_free(fw_plan *p);

/* nflog.c */
int cl_fw_nflog_start(fw *f, int fd, int group, char *err, size_t errlen);
void cl_fw_nflog_stop(fw *f);
void cl_fw_nflog_set_callback(fw *f, lua_State *L, int fwidx);
int cl_fw_nflog_stats(fw *f, lua_State *L);

/* dns.c */
typedef void (*fw_dns_cb)(fw *f, void *arg, const char *name, const fw_addr *addrs, size_t n,
                          uint32_t ttl, const char *err);
int cl_fw_dns_start(fw *f, const int *fds, lua_State *L, int resolvers_idx, char *err,
                    size_t errlen);
void cl_fw_dns_stop(fw *f);
int cl_fw_dns_query(fw *f, const char *name, fw_dns_cb cb, void *arg);
void cl_fw_dns_cancel(fw *f, void *arg);

/* vms.c: the registry of VMs, their sets, the DNS refresh of their names */
fw_vm *cl_fw_find_key(fw *f, const char *key);
fw_vm *cl_fw_find_iface(fw *f, const char *iface);
const char *cl_fw_vm_id_of(fw *f, const char *key);
int cl_fw_reg_insert(fw *f, fw_vm *v); /* ENOMEM or 0 */
void cl_fw_reg_remove(fw *f, fw_vm *v);
fw_vm *cl_fw_vm_new(const char *id);
void cl_fw_vm_free(fw *f, fw_vm *v); /* also stops its refresh timers */
int cl_fw_vm_add_set(fw_vm *v, const char *name);
int cl_fw_vm_plan_sets(fw_vm *v); /* the names of the sets its plan creates */
void cl_fw_emit(fw *f, const char *kind, const char *vm, int detail);
void cl_fw_push_addr_list(lua_State *L, const fw_addr *a, size_t n);
void cl_fw_emit_resolve(fw *f, const char *vm, const char *name, const fw_addr *a, size_t n,
                        uint32_t ttl, const char *err, int changed);
int cl_fw_set_host_addrs(fw_host *h, const fw_addr *a, size_t n, uint32_t ttl);
void cl_fw_refresh_start(fw *f, fw_vm *v); /* arms the timers of a VM just attached/updated */

/* spec.c: Lua spec table -> fw_plan */
typedef struct pbox { /* a userdata owning a plan while it is being parsed and used */
  fw_plan *p;
} pbox;
/* Validates the spec at idx completely (raises "bad field '...'"); pushes its pbox. */
fw_plan *cl_fw_parse_spec(lua_State *L, int idx, fw *f);
const char *cl_fw_check_id(lua_State *L, int arg);
void cl_fw_spec_register(lua_State *L);

/* txn.c: a transaction run from a Lua call */
enum { OP_BASE, OP_ATTACH, OP_UPDATE, OP_DETACH, OP_DESTROY, OP_REFRESH, OP_DUMP };
typedef struct tbox { /* a userdata owning a transaction until the kernel answered */
  fw_txn *t;
} tbox;
tbox *cl_fw_push_tbox(lua_State *L, fw_txn *t);
int cl_fw_run_txn(lua_State *L, fw *f, int bidx, lua_KFunction k);
fw_txn *cl_fw_resumed_txn(lua_State *L, lua_KContext ctx, int bidx);
int cl_fw_txn_result(lua_State *L, fw *f, fw_txn *t, const char *op, const char *id);
fw_txn *cl_fw_new_batch(lua_State *L, fw *f, int kind);
void cl_fw_ctx_add(lua_State *L, fw_txn *t, fw_vm *v);
void cl_fw_finish_batch(lua_State *L, fw *f, fw_txn *t, int err);
void cl_fw_txn_register(lua_State *L);

/* ops.c: attach, update, attach_many, detach, detach_many, reconcile into the methods table */
void cl_fw_ops_register(lua_State *L, int methods);

/* luaL_error does not return; saying so lets the analyzers follow the error paths. */
static inline __attribute__((noreturn)) void cl_fw_oom(lua_State *L) {
  luaL_error(L, "firewall: out of memory");
  __builtin_unreachable();
}

static inline fw *cl_fw_check(lua_State *L) {
  return CL_CHECK_OPEN(L, 1, fw, closed, FW_MT, "firewall");
}

#endif
