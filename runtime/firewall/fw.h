/*
 * Private header of the firewall primitive (the files of runtime/firewall). It is large enough
 * to be split by concern (netlink transport, ruleset messages, drop log, DNS, Lua API); what
 * these files share stays here rather than in clawlua.h, which is for what other primitives use.
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
  int err; /* first errno reported */
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
  int log_group; /* -1: none */
  /* DNS */
  fw_dns *dns;
  double min_ttl, max_ttl, dns_timeout;
  uint64_t batches, messages;
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

/* firewall.c */
fw_vm *cl_fw_find_key(fw *f, const char *key);
void cl_fw_emit(fw *f, const char *kind, const char *vm, int detail);

#endif
