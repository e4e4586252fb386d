/*
 * The ruleset, as nf_tables messages built with libnftnl.
 *
 *   table inet <t>
 *     map spoof   { type ifname : verdict }   iif -> jump vm_<p>_<hash>_s   (anti-spoofing)
 *     map egress  { type ifname : verdict }   iif -> jump vm_<p>_<hash>_o   (from the VM)
 *     map ingress { type ifname : verdict }   oif -> jump vm_<p>_<hash>_i   (to the VM)
 *     chain prerouting { hook prerouting priority -300 (raw): iifname vmap @spoof }
 *     chain input      { hook input priority -10:   iifname vmap @egress }
 *     chain forward    { hook forward priority -10: iifname vmap @egress; oifname vmap @ingress }
 *   table arp <t>
 *     map arp { type ifname : verdict }  chain input { hook input: iifname vmap @arp }
 *
 * A VM's chains exist only together with the map elements that jump to them: both are created
 * in one batch and deleted in one batch, so a VM chain that filters nothing cannot exist, and
 * a packet costs one hash lookup per map whatever the number of VMs. Anti-spoofing runs at
 * prerouting before conntrack (raw priority), so a spoofed packet never creates state; ARP is
 * invisible to the inet family, hence the small arp table. VM chains end in an explicit
 * verdict: "drop", or "return" for accept, so that traffic from one VM to another still meets
 * the receiving VM's ingress chain in the same base chain. Every rule has a counter and a
 * comment naming the spec entry it comes from ("egress.allow[3]").
 */
#include "fw.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_arp.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter_arp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libmnl/libmnl.h>
#include <libnftnl/chain.h>
#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/table.h>
#include <libnftnl/udata.h>
#include <openssl/evp.h>

#define PRIO_SPOOF  (-300) /* NF_IP_PRI_RAW: before conntrack */
#define PRIO_FILTER (-10)  /* just before the usual filter priority 0 */
/* nftables' own data type numbers, so that `nft list` prints our maps and sets readably. */
#define TYPE_IPADDR   7
#define TYPE_IP6ADDR  8
#define TYPE_IFNAME   41
#define ELEMS_PER_MSG 512
#define CT_EST_REL    ((1u << 1) | (1u << 2)) /* NF_CT_STATE_BIT(ESTABLISHED) | RELATED */
#define CT_INVALID    1u

static const char *const MAPS[] = {"spoof", "egress", "ingress"};

/* ------------------------------------------------------------------------------------------ */
/* Names                                                                                      */

void cl_fw_vm_names(const char *id, char *key, char *base) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  EVP_Digest(id, strlen(id), md, &mdlen, EVP_sha256(), NULL);
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < FW_HASH_HEX / 2; i++) {
    key[2 * i] = hex[md[i] >> 4];
    key[2 * i + 1] = hex[md[i] & 15];
  }
  key[FW_HASH_HEX] = 0;
  /* The prefix is for people reading `nft list ruleset`; uniqueness comes from the hash of the
   * whole id, never from the (cut) prefix. */
  char prefix[FW_PREFIX_MAX + 1];
  size_t n = 0;
  for (const char *p = id; *p && n < FW_PREFIX_MAX; p++) {
    char c = *p;
    int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    prefix[n++] = ok ? c : '_';
  }
  prefix[n] = 0;
  snprintf(base, FW_BASE_MAX, "vm_%s_%s", prefix, key);
}

static void chain_name(const char *base, char suffix, char *out) {
  snprintf(out, FW_NAME_MAX, "%s_%c", base, suffix);
}

char *cl_fw_set_name(const fw_vm *vm, unsigned gen, const fw_entry *e, int fam, char *out) {
  char slot[16];
  if (e->action == FW_DNS)
    snprintf(slot, sizeof slot, "dns");
  else
    snprintf(slot, sizeof slot, "%c%c%d", e->dir == FW_EGRESS ? 'o' : 'i',
             e->action == FW_ALLOW ? 'a' : 'd', e->index);
  snprintf(out, FW_NAME_MAX, "%s_g%u_%s_%d", vm->base, gen, slot, fam);
  return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Expressions                                                                                */

static void add(struct nftnl_rule *r, struct nftnl_expr *e) {
  nftnl_rule_add_expr(r, e);
}

static void x_meta(struct nftnl_rule *r, uint32_t key) {
  struct nftnl_expr *e = nftnl_expr_alloc("meta");
  nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
  nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, NFT_REG_1);
  add(r, e);
}

static void x_cmp(struct nftnl_rule *r, uint32_t op, const void *data, uint32_t len) {
  struct nftnl_expr *e = nftnl_expr_alloc("cmp");
  nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, op);
  nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, data, len);
  add(r, e);
}

static void x_payload(struct nftnl_rule *r, uint32_t base, uint32_t off, uint32_t len) {
  struct nftnl_expr *e = nftnl_expr_alloc("payload");
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, off);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, NFT_REG_1);
  add(r, e);
}

static void x_bitwise(struct nftnl_rule *r, const void *mask, const void * xor, uint32_t len) {
  struct nftnl_expr *e = nftnl_expr_alloc("bitwise");
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_DREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_LEN, len);
  nftnl_expr_set(e, NFTNL_EXPR_BITWISE_MASK, mask, len);
  nftnl_expr_set(e, NFTNL_EXPR_BITWISE_XOR, xor, len);
  add(r, e);
}

static void x_lookup(struct nftnl_rule *r, const char *set, uint32_t set_id, int verdict_map) {
  struct nftnl_expr *e = nftnl_expr_alloc("lookup");
  nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SREG, NFT_REG_1);
  if (verdict_map) nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_DREG, NFT_REG_VERDICT);
  nftnl_expr_set_str(e, NFTNL_EXPR_LOOKUP_SET, set);
  if (set_id) nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SET_ID, set_id);
  add(r, e);
}

static void x_range(struct nftnl_rule *r, uint16_t from, uint16_t to) {
  uint16_t a = htons(from), b = htons(to);
  if (from == to) {
    x_cmp(r, NFT_CMP_EQ, &a, 2);
    return;
  }
  struct nftnl_expr *e = nftnl_expr_alloc("range");
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_OP, NFT_RANGE_EQ);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_FROM_DATA, &a, 2);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_TO_DATA, &b, 2);
  add(r, e);
}

static void x_ct_state(struct nftnl_rule *r, uint32_t bits) {
  struct nftnl_expr *e = nftnl_expr_alloc("ct");
  nftnl_expr_set_u32(e, NFTNL_EXPR_CT_KEY, NFT_CT_STATE);
  nftnl_expr_set_u32(e, NFTNL_EXPR_CT_DREG, NFT_REG_1);
  add(r, e);
  uint32_t zero = 0;
  x_bitwise(r, &bits, &zero, 4);
  x_cmp(r, NFT_CMP_NEQ, &zero, 4);
}

static void x_limit(struct nftnl_rule *r, uint64_t rate, uint64_t burst, int bytes, int over) {
  struct nftnl_expr *e = nftnl_expr_alloc("limit");
  nftnl_expr_set_u64(e, NFTNL_EXPR_LIMIT_RATE, rate);
  nftnl_expr_set_u64(e, NFTNL_EXPR_LIMIT_UNIT, 1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LIMIT_BURST, (uint32_t)burst);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LIMIT_TYPE, bytes ? NFT_LIMIT_PKT_BYTES : NFT_LIMIT_PKTS);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LIMIT_FLAGS, over ? NFT_LIMIT_F_INV : 0);
  add(r, e);
}

static void x_counter(struct nftnl_rule *r) {
  add(r, nftnl_expr_alloc("counter"));
}

static void x_log(struct nftnl_rule *r, int group, const char *key, const char *label) {
  char prefix[128];
  snprintf(prefix, sizeof prefix, "clawlua:%s:%s", key, label);
  struct nftnl_expr *e = nftnl_expr_alloc("log");
  nftnl_expr_set_u16(e, NFTNL_EXPR_LOG_GROUP, (uint16_t)group);
  nftnl_expr_set_str(e, NFTNL_EXPR_LOG_PREFIX, prefix);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LOG_SNAPLEN, 128);
  add(r, e);
}

static void x_verdict(struct nftnl_rule *r, int verdict) {
  struct nftnl_expr *e = nftnl_expr_alloc("immediate");
  nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT);
  nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_VERDICT, (uint32_t)verdict);
  add(r, e);
}

static void x_nfproto(struct nftnl_rule *r, int fam) {
  uint8_t p = fam == 4 ? NFPROTO_IPV4 : NFPROTO_IPV6;
  x_meta(r, NFT_META_NFPROTO);
  x_cmp(r, NFT_CMP_EQ, &p, 1);
}

static void x_l4proto(struct nftnl_rule *r, uint8_t proto) {
  x_meta(r, NFT_META_L4PROTO);
  x_cmp(r, NFT_CMP_EQ, &proto, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Messages                                                                                   */

typedef struct build {
  fw *f;
  fw_txn *t;
  int vm;          /* index of the VM id in the transaction */
  const char *key; /* the VM's hash, for log prefixes */
  const fw_plan *p;
  int err;
} build;

static void put_rule(build *b, uint16_t family, const char *chain, const char *label,
                     struct nftnl_rule *r) {
  if (b->err) {
    nftnl_rule_free(r);
    return;
  }
  nftnl_rule_set_str(r, NFTNL_RULE_TABLE, b->f->table);
  nftnl_rule_set_str(r, NFTNL_RULE_CHAIN, chain);
  nftnl_rule_set_u32(r, NFTNL_RULE_FAMILY, family);
  if (label) {
    struct nftnl_udata_buf *u = nftnl_udata_buf_alloc(NFT_USERDATA_MAXLEN);
    if (u) {
      nftnl_udata_put_strz(u, NFTNL_UDATA_RULE_COMMENT, label);
      nftnl_rule_set_data(r, NFTNL_RULE_USERDATA, nftnl_udata_buf_data(u), nftnl_udata_buf_len(u));
      nftnl_udata_buf_free(u);
    }
  }
  struct nlmsghdr *nlh =
      cl_fw_txn_msg(b->f, b->t, NFT_MSG_NEWRULE, family, NLM_F_CREATE | NLM_F_APPEND, FW_OBJ_RULE,
                    b->vm, label ? label : chain);
  if (!nlh) {
    b->err = ENOMEM;
  } else {
    nftnl_rule_nlmsg_build_payload(nlh, r);
    cl_fw_txn_end_msg(b->t, nlh);
  }
  nftnl_rule_free(r);
}

static void put_table(build *b, uint16_t family, uint16_t type) {
  struct nftnl_table *tb = nftnl_table_alloc();
  nftnl_table_set_str(tb, NFTNL_TABLE_NAME, b->f->table);
  nftnl_table_set_u32(tb, NFTNL_TABLE_FAMILY, family);
  struct nlmsghdr *nlh =
      cl_fw_txn_msg(b->f, b->t, type, family, type == NFT_MSG_NEWTABLE ? NLM_F_CREATE : 0,
                    FW_OBJ_TABLE, -1, b->f->table);
  if (!nlh)
    b->err = ENOMEM;
  else {
    nftnl_table_nlmsg_build_payload(nlh, tb);
    cl_fw_txn_end_msg(b->t, nlh);
  }
  nftnl_table_free(tb);
}

/* type: NEWCHAIN (base chain when hook >= 0), DELCHAIN, or DELRULE (flush). */
static void put_chain(build *b, uint16_t type, uint16_t family, const char *name, int hook,
                      int prio, uint16_t flags, const char *comment) {
  if (b->err) return;
  if (type == NFT_MSG_DELRULE) {
    struct nftnl_rule *r = nftnl_rule_alloc();
    nftnl_rule_set_str(r, NFTNL_RULE_TABLE, b->f->table);
    nftnl_rule_set_str(r, NFTNL_RULE_CHAIN, name);
    nftnl_rule_set_u32(r, NFTNL_RULE_FAMILY, family);
    struct nlmsghdr *nlh =
        cl_fw_txn_msg(b->f, b->t, NFT_MSG_DELRULE, family, 0, FW_OBJ_FLUSH, b->vm, name);
    if (!nlh)
      b->err = ENOMEM;
    else {
      nftnl_rule_nlmsg_build_payload(nlh, r);
      cl_fw_txn_end_msg(b->t, nlh);
    }
    nftnl_rule_free(r);
    return;
  }
  struct nftnl_chain *c = nftnl_chain_alloc();
  nftnl_chain_set_str(c, NFTNL_CHAIN_TABLE, b->f->table);
  nftnl_chain_set_str(c, NFTNL_CHAIN_NAME, name);
  nftnl_chain_set_u32(c, NFTNL_CHAIN_FAMILY, family);
  if (hook >= 0) {
    nftnl_chain_set_u32(c, NFTNL_CHAIN_HOOKNUM, (uint32_t)hook);
    nftnl_chain_set_s32(c, NFTNL_CHAIN_PRIO, prio);
    nftnl_chain_set_str(c, NFTNL_CHAIN_TYPE, "filter");
    nftnl_chain_set_u32(c, NFTNL_CHAIN_POLICY, NF_ACCEPT);
  }
  if (comment) {
    struct nftnl_udata_buf *u = nftnl_udata_buf_alloc(NFT_USERDATA_MAXLEN);
    if (u) {
      nftnl_udata_put_strz(u, NFTNL_UDATA_CHAIN_COMMENT, comment);
      nftnl_chain_set_data(c, NFTNL_CHAIN_USERDATA, nftnl_udata_buf_data(u),
                           nftnl_udata_buf_len(u));
      nftnl_udata_buf_free(u);
    }
  }
  struct nlmsghdr *nlh = cl_fw_txn_msg(b->f, b->t, type, family, flags, FW_OBJ_CHAIN, b->vm, name);
  if (!nlh)
    b->err = ENOMEM;
  else {
    nftnl_chain_nlmsg_build_payload(nlh, c);
    cl_fw_txn_end_msg(b->t, nlh);
  }
  nftnl_chain_free(c);
}

/* Tells `nft list` how to print keys: ifname strings are in host order, addresses big
 * endian (nftables' enum byteorder). */
static void set_byteorder(struct nftnl_set *s, uint32_t order) {
  struct nftnl_udata_buf *u = nftnl_udata_buf_alloc(64);
  if (!u) return;
  nftnl_udata_put_u32(u, NFTNL_UDATA_SET_KEYBYTEORDER, order);
  nftnl_set_set_data(s, NFTNL_SET_USERDATA, nftnl_udata_buf_data(u), nftnl_udata_buf_len(u));
  nftnl_udata_buf_free(u);
}

static struct nftnl_set *set_obj(build *b, uint16_t family, const char *name) {
  struct nftnl_set *s = nftnl_set_alloc();
  nftnl_set_set_str(s, NFTNL_SET_TABLE, b->f->table);
  nftnl_set_set_str(s, NFTNL_SET_NAME, name);
  nftnl_set_set_u32(s, NFTNL_SET_FAMILY, family);
  return s;
}

static void put_set_msg(build *b, uint16_t type, uint16_t family, uint16_t flags, uint8_t kind,
                        const char *name, struct nftnl_set *s) {
  struct nlmsghdr *nlh = cl_fw_txn_msg(b->f, b->t, type, family, flags, kind, b->vm, name);
  if (!nlh) {
    b->err = ENOMEM;
    return;
  }
  if (type == NFT_MSG_NEWSET || type == NFT_MSG_DELSET)
    nftnl_set_nlmsg_build_payload(nlh, s);
  else
    nftnl_set_elems_nlmsg_build_payload(nlh, s);
  cl_fw_txn_end_msg(b->t, nlh);
}

static void put_map(build *b, uint16_t family, const char *name) {
  if (b->err) return;
  struct nftnl_set *s = set_obj(b, family, name);
  nftnl_set_set_u32(s, NFTNL_SET_FLAGS, NFT_SET_MAP);
  nftnl_set_set_u32(s, NFTNL_SET_KEY_TYPE, TYPE_IFNAME);
  nftnl_set_set_u32(s, NFTNL_SET_KEY_LEN, IFNAMSIZ);
  nftnl_set_set_u32(s, NFTNL_SET_DATA_TYPE, NFT_DATA_VERDICT);
  nftnl_set_set_u32(s, NFTNL_SET_ID, ++b->t->set_id);
  set_byteorder(s, 1);
  put_set_msg(b, NFT_MSG_NEWSET, family, NLM_F_CREATE, FW_OBJ_SET, name, s);
  nftnl_set_free(s);
}

/* A map element iface -> jump chain (add), or the removal of iface's element. */
static void put_map_elem(build *b, uint16_t family, const char *map, const char *iface,
                         const char *chain, int del) {
  if (b->err) return;
  struct nftnl_set *s = set_obj(b, family, map);
  struct nftnl_set_elem *e = nftnl_set_elem_alloc();
  char key[IFNAMSIZ] = {0};
  memcpy(key, iface, strnlen(iface, IFNAMSIZ - 1));
  nftnl_set_elem_set(e, NFTNL_SET_ELEM_KEY, key, IFNAMSIZ);
  if (!del) {
    nftnl_set_elem_set_u32(e, NFTNL_SET_ELEM_VERDICT, NFT_JUMP);
    nftnl_set_elem_set_str(e, NFTNL_SET_ELEM_CHAIN, chain);
  }
  nftnl_set_elem_add(s, e);
  char what[FW_NAME_MAX];
  snprintf(what, sizeof what, "%s in %s", iface, map);
  put_set_msg(b, del ? NFT_MSG_DELSETELEM : NFT_MSG_NEWSETELEM, family,
              del ? 0 : (NLM_F_CREATE | NLM_F_EXCL), FW_OBJ_MAPELEM, what, s);
  nftnl_set_free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* Address sets                                                                               */

typedef struct ival {
  uint8_t lo[16], hi[16]; /* inclusive */
} ival;

static int cmp_ival(const void *a, const void *b) {
  return memcmp(((const ival *)a)->lo, ((const ival *)b)->lo, 16);
}

/* x += 1 over len bytes; returns 1 on overflow. */
static int incr(uint8_t *x, int len) {
  for (int i = len - 1; i >= 0; i--)
    if (++x[i] != 0) return 0;
  return 1;
}

static void to_ival(const fw_addr *a, int len, ival *v) {
  memset(v, 0, sizeof *v);
  for (int i = 0; i < len; i++) {
    int bits = (int)a->plen - 8 * i;
    uint8_t mask = bits >= 8 ? 0xff : bits <= 0 ? 0 : (uint8_t)(0xff << (8 - bits));
    v->lo[i] = a->a[i] & mask;
    v->hi[i] = (uint8_t)(a->a[i] | (uint8_t)~mask);
  }
}

/* An interval set of the addresses of family fam: overlapping CIDRs are merged first (the
 * kernel refuses overlapping intervals); an interval that reaches the top of the address space
 * has no end element. */
static void put_addr_set(build *b, const char *name, uint32_t set_id, int fam,
                         const fw_addr *const *lists, const size_t *counts, int nlists,
                         int create) {
  if (b->err) return;
  int len = fam == 4 ? 4 : 16;
  struct nftnl_set *s;
  if (create) {
    s = set_obj(b, NFPROTO_INET, name);
    nftnl_set_set_u32(s, NFTNL_SET_FLAGS, NFT_SET_INTERVAL);
    nftnl_set_set_u32(s, NFTNL_SET_KEY_TYPE, fam == 4 ? TYPE_IPADDR : TYPE_IP6ADDR);
    nftnl_set_set_u32(s, NFTNL_SET_KEY_LEN, (uint32_t)len);
    nftnl_set_set_u32(s, NFTNL_SET_ID, set_id);
    set_byteorder(s, 2);
    put_set_msg(b, NFT_MSG_NEWSET, NFPROTO_INET, NLM_F_CREATE | NLM_F_EXCL, FW_OBJ_SET, name, s);
    nftnl_set_free(s);
    if (b->err) return;
  }

  size_t total = 0;
  for (int l = 0; l < nlists; l++) total += counts[l];
  if (total == 0) return;
  ival *v = malloc(total * sizeof *v);
  if (!v) {
    b->err = ENOMEM;
    return;
  }
  size_t n = 0;
  for (int l = 0; l < nlists; l++)
    for (size_t i = 0; i < counts[l]; i++)
      if (lists[l][i].fam == fam) to_ival(&lists[l][i], len, &v[n++]);
  qsort(v, n, sizeof *v, cmp_ival);
  size_t m = 0;
  for (size_t i = 0; i < n; i++) {
    if (m > 0) {
      uint8_t next[16];
      memcpy(next, v[m - 1].hi, 16);
      int top = incr(next, len);
      if (top || memcmp(v[i].lo, next, (size_t)len) <= 0) { /* overlaps or touches */
        if (memcmp(v[i].hi, v[m - 1].hi, (size_t)len) > 0) memcpy(v[m - 1].hi, v[i].hi, 16);
        continue;
      }
    }
    v[m++] = v[i];
  }
  s = NULL;
  size_t inmsg = 0;
  for (size_t i = 0; i < m && !b->err; i++) {
    if (!s) s = set_obj(b, NFPROTO_INET, name);
    struct nftnl_set_elem *e = nftnl_set_elem_alloc();
    nftnl_set_elem_set(e, NFTNL_SET_ELEM_KEY, v[i].lo, (uint32_t)len);
    nftnl_set_elem_add(s, e);
    uint8_t end[16];
    memcpy(end, v[i].hi, 16);
    if (!incr(end, len)) {
      e = nftnl_set_elem_alloc();
      nftnl_set_elem_set(e, NFTNL_SET_ELEM_KEY, end, (uint32_t)len);
      nftnl_set_elem_set_u32(e, NFTNL_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
      nftnl_set_elem_add(s, e);
    }
    if (++inmsg == ELEMS_PER_MSG || i + 1 == m) {
      put_set_msg(b, NFT_MSG_NEWSETELEM, NFPROTO_INET, NLM_F_CREATE, FW_OBJ_ELEM, name, s);
      nftnl_set_free(s);
      s = NULL;
      inmsg = 0;
    }
  }
  if (s) nftnl_set_free(s);
  free(v);
}

static void del_set(build *b, const char *name) {
  if (b->err) return;
  struct nftnl_set *s = set_obj(b, NFPROTO_INET, name);
  put_set_msg(b, NFT_MSG_DELSET, NFPROTO_INET, 0, FW_OBJ_SET, name, s);
  nftnl_set_free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* The base ruleset                                                                           */

static void vmap_rule(build *b, uint16_t family, const char *chain, uint32_t meta,
                      const char *map) {
  struct nftnl_rule *r = nftnl_rule_alloc();
  x_meta(r, meta);
  x_lookup(r, map, 0, 1);
  put_rule(b, family, chain, NULL, r);
}

/* Creates what is missing and rewrites the base chains' rules (repairing them if someone
 * edited them), in one batch; VM chains, sets and map elements are left as they are. */
int cl_fw_build_base(fw *f, fw_txn *t) {
  build b = {.f = f, .t = t, .vm = -1};
  put_table(&b, NFPROTO_INET, NFT_MSG_NEWTABLE);
  for (size_t i = 0; i < CL_ARRAY_LEN(MAPS); i++) put_map(&b, NFPROTO_INET, MAPS[i]);
  put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, "prerouting", NF_INET_PRE_ROUTING, PRIO_SPOOF,
            NLM_F_CREATE, NULL);
  put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, "input", NF_INET_LOCAL_IN, PRIO_FILTER,
            NLM_F_CREATE, NULL);
  put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, "forward", NF_INET_FORWARD, PRIO_FILTER,
            NLM_F_CREATE, NULL);
  put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, "prerouting", -1, 0, 0, NULL);
  put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, "input", -1, 0, 0, NULL);
  put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, "forward", -1, 0, 0, NULL);
  vmap_rule(&b, NFPROTO_INET, "prerouting", NFT_META_IIFNAME, "spoof");
  vmap_rule(&b, NFPROTO_INET, "input", NFT_META_IIFNAME, "egress");
  vmap_rule(&b, NFPROTO_INET, "forward", NFT_META_IIFNAME, "egress");
  vmap_rule(&b, NFPROTO_INET, "forward", NFT_META_OIFNAME, "ingress");

  put_table(&b, NFPROTO_ARP, NFT_MSG_NEWTABLE);
  put_map(&b, NFPROTO_ARP, "arp");
  put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_ARP, "input", NF_ARP_IN, 0, NLM_F_CREATE, NULL);
  put_chain(&b, NFT_MSG_DELRULE, NFPROTO_ARP, "input", -1, 0, 0, NULL);
  vmap_rule(&b, NFPROTO_ARP, "input", NFT_META_IIFNAME, "arp");
  return b.err;
}

int cl_fw_build_delete_table(fw *f, fw_txn *t) {
  build b = {.f = f, .t = t, .vm = -1};
  put_table(&b, NFPROTO_INET, NFT_MSG_DELTABLE);
  put_table(&b, NFPROTO_ARP, NFT_MSG_DELTABLE);
  return b.err;
}

/* ------------------------------------------------------------------------------------------ */
/* A VM's rules                                                                               */

/* Ends a drop rule: counter, optional log, verdict. With a log rate, the log goes into a rule
 * of its own in front (a limit that does not match would otherwise skip the drop too). */
static void drop_rule(build *b, uint16_t family, const char *chain, const char *label,
                      struct nftnl_rule *r, struct nftnl_rule *logr) {
  const fw_plan *p = b->p;
  int logging = p->log && b->f->log_group >= 0;
  if (logr) {
    if (logging && p->log_rate) {
      x_limit(logr, p->log_rate, p->log_burst ? p->log_burst : p->log_rate, 0, 0);
      x_log(logr, b->f->log_group, b->key, label);
      put_rule(b, family, chain, NULL, logr);
    } else {
      nftnl_rule_free(logr);
    }
  }
  x_counter(r);
  if (logging && !p->log_rate) x_log(r, b->f->log_group, b->key, label);
  x_verdict(r, NF_DROP);
  put_rule(b, family, chain, label, r);
}

/* The matches of a spoof/entry rule are built twice when a separate log rule is needed. */
typedef void (*match_fn)(struct nftnl_rule *r, const void *arg);

static void drop_with(build *b, uint16_t family, const char *chain, const char *label, match_fn m,
                      const void *arg) {
  struct nftnl_rule *r = nftnl_rule_alloc();
  m(r, arg);
  struct nftnl_rule *logr = NULL;
  if (b->p->log && b->p->log_rate && b->f->log_group >= 0) {
    logr = nftnl_rule_alloc();
    m(logr, arg);
  }
  drop_rule(b, family, chain, label, r, logr);
}

static void ret_with(build *b, const char *chain, const char *label, match_fn m, const void *arg) {
  struct nftnl_rule *r = nftnl_rule_alloc();
  m(r, arg);
  x_counter(r);
  x_verdict(r, NFT_RETURN);
  put_rule(b, NFPROTO_INET, chain, label, r);
}

static void m_none(struct nftnl_rule *r, const void *arg) {
  (void)r, (void)arg;
}

static void m_mac(struct nftnl_rule *r, const void *arg) {
  uint16_t ether = ARPHRD_ETHER;
  x_meta(r, NFT_META_IIFTYPE);
  x_cmp(r, NFT_CMP_EQ, &ether, 2);
  x_payload(r, NFT_PAYLOAD_LL_HEADER, 6, 6);
  x_cmp(r, NFT_CMP_NEQ, arg, 6);
}

static void m_v4(struct nftnl_rule *r, const void *arg) {
  x_nfproto(r, 4);
}
static void m_v6(struct nftnl_rule *r, const void *arg) {
  x_nfproto(r, 6);
}

static void m_v4_not(struct nftnl_rule *r, const void *arg) {
  x_nfproto(r, 4);
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 12, 4);
  x_cmp(r, NFT_CMP_NEQ, arg, 4);
}

static void m_v6_is(struct nftnl_rule *r, const void *arg) {
  x_nfproto(r, 6);
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16);
  x_cmp(r, NFT_CMP_EQ, arg, 16);
}

static void m_v6_linklocal(struct nftnl_rule *r, const void *arg) {
  static const uint8_t mask[2] = {0xff, 0xc0}, ll[2] = {0xfe, 0x80}, zero[2] = {0, 0};
  x_nfproto(r, 6);
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 2);
  x_bitwise(r, mask, zero, 2);
  x_cmp(r, NFT_CMP_EQ, ll, 2);
}

static void m_v6_dad(struct nftnl_rule *r, const void *arg) {
  static const uint8_t any[16] = {0};
  x_nfproto(r, 6);
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16);
  x_cmp(r, NFT_CMP_EQ, any, 16);
  x_l4proto(r, IPPROTO_ICMPV6);
}

static void m_ct(struct nftnl_rule *r, const void *arg) {
  x_ct_state(r, *(const uint32_t *)arg);
}

typedef struct rate_arg {
  uint64_t rate, burst;
  int bytes;
} rate_arg;

static void m_rate(struct nftnl_rule *r, const void *arg) {
  const rate_arg *a = arg;
  x_limit(r, a->rate, a->burst, a->bytes, 1);
}

static void m_nd(struct nftnl_rule *r, const void *arg) {
  uint8_t hl = 255;
  x_nfproto(r, 6);
  x_l4proto(r, IPPROTO_ICMPV6);
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 7, 1);
  x_cmp(r, NFT_CMP_EQ, &hl, 1);
  x_payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1);
  struct nftnl_expr *e = nftnl_expr_alloc("range");
  uint8_t lo = 133, hi = 136; /* router solicitation .. neighbour advertisement */
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_OP, NFT_RANGE_EQ);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_FROM_DATA, &lo, 1);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_TO_DATA, &hi, 1);
  add(r, e);
}

static void m_metadata(struct nftnl_rule *r, const void *arg) {
  struct in_addr md;
  inet_pton(AF_INET, FW_METADATA_ADDR, &md);
  x_nfproto(r, 4);
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 16, 4);
  x_cmp(r, NFT_CMP_EQ, &md, 4);
}

static void m_dns_other(struct nftnl_rule *r, const void *arg) {
  uint8_t proto = *(const uint8_t *)arg;
  x_l4proto(r, proto);
  x_payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
  x_range(r, 53, 53);
}

/* One concrete rule of an entry: family (0: both), layer-4 protocol (0: any), and its
 * addresses: a set, or one CIDR matched inline. */
typedef struct entry_arg {
  const fw_entry *e;
  int fam;
  uint8_t l4;
  const char *set;
  uint32_t set_id;
  const fw_addr *cidr;
} entry_arg;

static void m_entry(struct nftnl_rule *r, const void *arg) {
  const entry_arg *a = arg;
  const fw_entry *e = a->e;
  if (a->fam) x_nfproto(r, a->fam);
  if (a->set) {
    /* From the VM: match the destination; to the VM: the source. */
    uint32_t off = a->fam == 4 ? (e->dir == FW_EGRESS ? 16 : 12) : (e->dir == FW_EGRESS ? 24 : 8);
    x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, off, a->fam == 4 ? 4 : 16);
    x_lookup(r, a->set, a->set_id, 0);
  } else if (a->cidr) {
    uint32_t len = a->fam == 4 ? 4 : 16;
    uint32_t off = a->fam == 4 ? (e->dir == FW_EGRESS ? 16 : 12) : (e->dir == FW_EGRESS ? 24 : 8);
    ival v;
    to_ival(a->cidr, (int)len, &v);
    if (a->cidr->plen == 0) return; /* the whole family: the nfproto match says it all */
    /* Only the bytes the prefix covers are loaded; a partial last byte is masked. */
    uint32_t n = (a->cidr->plen + 7u) / 8u;
    x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, off, n);
    if (a->cidr->plen % 8) {
      uint8_t mask[16] = {0}, zero[16] = {0};
      for (uint32_t i = 0; i < n; i++) mask[i] = 0xff;
      mask[n - 1] = (uint8_t)(0xff << (8 - a->cidr->plen % 8));
      x_bitwise(r, mask, zero, n);
    }
    x_cmp(r, NFT_CMP_EQ, v.lo, n);
    (void)len;
  }
  if (a->l4) x_l4proto(r, a->l4);
  if (e->pfrom) {
    x_payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
    x_range(r, e->pfrom, e->pto);
  }
}

static size_t entry_count(const fw_entry *e, int fam) {
  size_t n = 0;
  for (size_t i = 0; i < e->naddrs; i++) n += e->addrs[i].fam == fam;
  return n;
}

/* Whether an entry's addresses of family fam live in a named set. Sets serve domain names
 * (their addresses change) and long lists; a few CIDRs are matched inline instead, because
 * the kernel finds a set by name with a linear walk over the table's sets: one set per entry
 * per VM made attaching N VMs cost O(N^2) in the kernel (measured: 1,000 VMs, 2.0 s). */
int cl_fw_entry_uses_set(const fw_entry *e, int fam) {
  if (e->any) return 0;
  if (e->nhosts) return 1;
  return entry_count(e, fam) > FW_INLINE_MAX;
}

/* Creates the sets of an entry (one per address family it needs). */
static void entry_sets(build *b, const fw_vm *vm, unsigned gen, const fw_entry *e,
                       char names[2][FW_NAME_MAX], uint32_t ids[2]) {
  for (int k = 0; k < 2; k++) {
    int fam = k == 0 ? 4 : 6;
    names[k][0] = 0;
    ids[k] = 0;
    if (!cl_fw_entry_uses_set(e, fam)) continue;
    cl_fw_set_name(vm, gen, e, fam, names[k]);
    ids[k] = ++b->t->set_id;
    const fw_addr *lists[1 + FW_MAX_HOSTS];
    size_t counts[1 + FW_MAX_HOSTS];
    int nl = 0;
    lists[nl] = e->addrs;
    counts[nl++] = e->naddrs;
    for (size_t h = 0; h < e->nhosts && nl < (int)CL_ARRAY_LEN(lists); h++) {
      lists[nl] = e->hosts[h].addrs;
      counts[nl++] = e->hosts[h].naddrs;
    }
    put_addr_set(b, names[k], ids[k], fam, lists, counts, nl, 1);
  }
}

static void entry_rules(build *b, const char *chain, const fw_entry *e, char names[2][FW_NAME_MAX],
                        const uint32_t ids[2], int verdict) {
  int fams[2], nf = 0;
  if (e->any) {
    if (e->proto & FW_P_ICMP) {
      fams[nf++] = 4;
      fams[nf++] = 6;
    } else {
      fams[nf++] = 0;
    }
  } else {
    if (names[0][0] || entry_count(e, 4)) fams[nf++] = 4;
    if (names[1][0] || entry_count(e, 6)) fams[nf++] = 6;
  }
  uint8_t protos[3];
  int np = 0;
  unsigned pr = e->proto;
  if (!pr && e->pfrom) pr = FW_P_TCP | FW_P_UDP;
  if (pr & FW_P_TCP) protos[np++] = IPPROTO_TCP;
  if (pr & FW_P_UDP) protos[np++] = IPPROTO_UDP;
  if (pr & FW_P_ICMP) protos[np++] = IPPROTO_ICMP;
  if (!pr) protos[np++] = 0;
  for (int i = 0; i < nf; i++) {
    for (int j = 0; j < np; j++) {
      entry_arg a = {.e = e, .fam = fams[i], .l4 = protos[j]};
      if (a.l4 == IPPROTO_ICMP && a.fam == 6) a.l4 = IPPROTO_ICMPV6;
      int k = fams[i] == 4 ? 0 : 1;
      if (fams[i] && !e->any && names[k][0]) {
        a.set = names[k];
        a.set_id = ids[k];
      }
      /* Without a set: one rule per CIDR of the family. */
      size_t ncidr = (fams[i] && !e->any && !a.set) ? e->naddrs : 1;
      for (size_t c = 0; c < ncidr; c++) {
        if (fams[i] && !e->any && !a.set) {
          if (e->addrs[c].fam != fams[i]) continue;
          a.cidr = &e->addrs[c];
        }
        if (verdict == NF_DROP)
          drop_with(b, NFPROTO_INET, chain, e->label, m_entry, &a);
        else
          ret_with(b, chain, e->label, m_entry, &a);
      }
    }
  }
}

static void direction_rules(build *b, const fw_vm *vm, unsigned gen, int dir, const char *chain) {
  const fw_plan *p = b->p;
  const char *d = dir == FW_EGRESS ? "egress" : "ingress";
  char label[40];
  if (p->rate[dir].packets) {
    rate_arg a = {p->rate[dir].packets,
                  p->rate[dir].burst ? p->rate[dir].burst : p->rate[dir].packets, 0};
    snprintf(label, sizeof label, "%s.rate", d);
    drop_with(b, NFPROTO_INET, chain, label, m_rate, &a);
  }
  if (p->rate[dir].bytes) {
    rate_arg a = {p->rate[dir].bytes, p->rate[dir].burst ? p->rate[dir].burst : p->rate[dir].bytes,
                  1};
    snprintf(label, sizeof label, "%s.rate_bytes", d);
    drop_with(b, NFPROTO_INET, chain, label, m_rate, &a);
  }
  uint32_t est = CT_EST_REL, inv = CT_INVALID;
  snprintf(label, sizeof label, "%s.established", d);
  ret_with(b, chain, label, m_ct, &est);
  snprintf(label, sizeof label, "%s.invalid", d);
  drop_with(b, NFPROTO_INET, chain, label, m_ct, &inv);
  if (dir == FW_EGRESS && p->has6) ret_with(b, chain, "egress.nd", m_nd, NULL);

  /* Order: deny entries, DNS (egress), explicitly allowed metadata, the metadata drop, the
   * other allow entries, the policy. A deny always wins over an allow. */
  for (int pass = 0; pass < 4; pass++) {
    for (size_t i = 0; i < p->nentries; i++) {
      const fw_entry *e = &p->entries[i];
      if (e->dir != dir) continue;
      int want = pass == 0   ? e->action == FW_DENY
                 : pass == 1 ? e->action == FW_DNS
                 : pass == 2 ? (e->action == FW_ALLOW && e->metadata)
                             : (e->action == FW_ALLOW && !e->metadata);
      if (!want) continue;
      char names[2][FW_NAME_MAX];
      uint32_t ids[2];
      entry_sets(b, vm, gen, e, names, ids);
      entry_rules(b, chain, e, names, ids, e->action == FW_DENY ? NF_DROP : NFT_RETURN);
    }
    if (dir == FW_EGRESS && pass == 1) {
      /* DNS only to the configured resolvers (accepted just above). */
      uint8_t tcp = IPPROTO_TCP, udp = IPPROTO_UDP;
      drop_with(b, NFPROTO_INET, chain, "egress.dns_other", m_dns_other, &udp);
      drop_with(b, NFPROTO_INET, chain, "egress.dns_other", m_dns_other, &tcp);
    }
    if (dir == FW_EGRESS && pass == 2) /* after the entries that name it explicitly */
      drop_with(b, NFPROTO_INET, chain, "egress.metadata", m_metadata, NULL);
  }
  snprintf(label, sizeof label, "%s.policy", d);
  if (p->accept[dir])
    ret_with(b, chain, label, m_none, NULL);
  else
    drop_with(b, NFPROTO_INET, chain, label, m_none, NULL);
}

static void spoof_rules(build *b, const char *chain) {
  const fw_plan *p = b->p;
  if (p->has_mac) drop_with(b, NFPROTO_INET, chain, "spoof.mac", m_mac, p->mac);
  if (p->has4)
    drop_with(b, NFPROTO_INET, chain, "spoof.ip", m_v4_not, p->ip4.a);
  else
    drop_with(b, NFPROTO_INET, chain, "spoof.ip", m_v4, NULL);
  if (p->has6) {
    ret_with(b, chain, "spoof.ip6_ok", m_v6_is, p->ip6.a);
    ret_with(b, chain, "spoof.ip6_linklocal", m_v6_linklocal, NULL);
    ret_with(b, chain, "spoof.ip6_dad", m_v6_dad, NULL);
  }
  drop_with(b, NFPROTO_INET, chain, "spoof.ip6", m_v6, NULL);
}

/* ARP from the tap: only Ethernet/IPv4 ARP whose sender is the VM (or 0.0.0.0, a probe). */
static void m_arp_shape(struct nftnl_rule *r, const void *arg) {
  static const uint8_t want[6] = {0, 1, 8, 0, 6, 4}; /* htype 1, ptype 0x0800, hlen 6, plen 4 */
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 0, 6);
  x_cmp(r, NFT_CMP_NEQ, want, 6);
}

static void m_arp_sha(struct nftnl_rule *r, const void *arg) {
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 6);
  x_cmp(r, NFT_CMP_NEQ, arg, 6);
}

static void m_arp_ll(struct nftnl_rule *r, const void *arg) {
  x_payload(r, NFT_PAYLOAD_LL_HEADER, 6, 6);
  x_cmp(r, NFT_CMP_NEQ, arg, 6);
}

static void m_arp_spa(struct nftnl_rule *r, const void *arg) {
  x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 14, 4);
  x_cmp(r, arg ? NFT_CMP_NEQ : NFT_CMP_EQ, arg ? arg : (const void *)"\0\0\0\0", 4);
}

static void arp_rules(build *b, const char *chain) {
  const fw_plan *p = b->p;
  drop_with(b, NFPROTO_ARP, chain, "arp.shape", m_arp_shape, NULL);
  if (p->has_mac) {
    drop_with(b, NFPROTO_ARP, chain, "arp.mac", m_arp_ll, p->mac);
    drop_with(b, NFPROTO_ARP, chain, "arp.sender_mac", m_arp_sha, p->mac);
  }
  if (p->has4) {
    struct nftnl_rule *r = nftnl_rule_alloc();
    m_arp_spa(r, NULL);
    x_counter(r);
    x_verdict(r, NFT_RETURN);
    put_rule(b, NFPROTO_ARP, chain, "arp.probe", r);
    drop_with(b, NFPROTO_ARP, chain, "arp.sender_ip", m_arp_spa, p->ip4.a);
  } else {
    drop_with(b, NFPROTO_ARP, chain, "arp.sender_ip", m_none, NULL);
  }
}

/* Attach (replace == 0): chains, sets, rules and map elements of a new VM. Update
 * (replace == 1, old = the VM as it is): the chains are flushed and refilled, the old sets
 * deleted and new ones (next generation of names) created, the map elements moved if the
 * interface changed. Either way one batch: packets see the old rules or the new ones. */
int cl_fw_build_attach(fw *f, fw_txn *t, fw_vm *vm, const fw_plan *p, int replace,
                       const fw_vm *old) {
  build b = {.f = f, .t = t, .p = p, .key = vm->key};
  b.vm = cl_fw_txn_vm(t, vm->id);
  if (b.vm < 0) return ENOMEM;
  char cs[FW_NAME_MAX], co[FW_NAME_MAX], ci[FW_NAME_MAX], ca[FW_NAME_MAX];
  chain_name(vm->base, 's', cs);
  chain_name(vm->base, 'o', co);
  chain_name(vm->base, 'i', ci);
  chain_name(vm->base, 'a', ca);
  if (!replace) {
    uint16_t fl = NLM_F_CREATE | NLM_F_EXCL;
    put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, cs, -1, 0, fl, vm->id);
    put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, co, -1, 0, fl, vm->id);
    put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, ci, -1, 0, fl, vm->id);
    put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_ARP, ca, -1, 0, fl, vm->id);
  } else {
    put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, cs, -1, 0, 0, NULL);
    put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, co, -1, 0, 0, NULL);
    put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, ci, -1, 0, 0, NULL);
    put_chain(&b, NFT_MSG_DELRULE, NFPROTO_ARP, ca, -1, 0, 0, NULL);
    for (size_t i = 0; i < old->nsets; i++) del_set(&b, old->sets[i]);
  }
  spoof_rules(&b, cs);
  direction_rules(&b, vm, vm->gen, FW_EGRESS, co);
  direction_rules(&b, vm, vm->gen, FW_INGRESS, ci);
  arp_rules(&b, ca);
  int moved = replace && strcmp(old->iface, p->iface) != 0;
  if (moved) {
    put_map_elem(&b, NFPROTO_INET, "spoof", old->iface, NULL, 1);
    put_map_elem(&b, NFPROTO_INET, "egress", old->iface, NULL, 1);
    put_map_elem(&b, NFPROTO_INET, "ingress", old->iface, NULL, 1);
    put_map_elem(&b, NFPROTO_ARP, "arp", old->iface, NULL, 1);
  }
  if (!replace || moved) {
    put_map_elem(&b, NFPROTO_INET, "spoof", p->iface, cs, 0);
    put_map_elem(&b, NFPROTO_INET, "egress", p->iface, co, 0);
    put_map_elem(&b, NFPROTO_INET, "ingress", p->iface, ci, 0);
    put_map_elem(&b, NFPROTO_ARP, "arp", p->iface, ca, 0);
  }
  return b.err;
}

int cl_fw_build_detach(fw *f, fw_txn *t, const fw_vm *vm) {
  build b = {.f = f, .t = t};
  b.vm = cl_fw_txn_vm(t, vm->id);
  if (b.vm < 0) return ENOMEM;
  char name[FW_NAME_MAX];
  if (vm->iface[0]) {
    put_map_elem(&b, NFPROTO_INET, "spoof", vm->iface, NULL, 1);
    put_map_elem(&b, NFPROTO_INET, "egress", vm->iface, NULL, 1);
    put_map_elem(&b, NFPROTO_INET, "ingress", vm->iface, NULL, 1);
    put_map_elem(&b, NFPROTO_ARP, "arp", vm->iface, NULL, 1);
  }
  static const char sfx[] = {'s', 'o', 'i'};
  for (size_t i = 0; i < sizeof sfx; i++) {
    chain_name(vm->base, sfx[i], name);
    put_chain(&b, NFT_MSG_DELCHAIN, NFPROTO_INET, name, -1, 0, 0, NULL);
  }
  chain_name(vm->base, 'a', name);
  put_chain(&b, NFT_MSG_DELCHAIN, NFPROTO_ARP, name, -1, 0, 0, NULL);
  for (size_t i = 0; i < vm->nsets; i++) del_set(&b, vm->sets[i]);
  return b.err;
}

/* New contents of the sets of one entry (its domain names were resolved again): the sets are
 * flushed and refilled in one batch, so a lookup sees the old or the new addresses. */
int cl_fw_build_set_refresh(fw *f, fw_txn *t, const fw_vm *vm, size_t entry) {
  const fw_entry *e = &vm->plan->entries[entry];
  build b = {.f = f, .t = t, .p = vm->plan, .key = vm->key};
  b.vm = cl_fw_txn_vm(t, vm->id);
  if (b.vm < 0) return ENOMEM;
  for (int k = 0; k < 2; k++) {
    int fam = k == 0 ? 4 : 6;
    char name[FW_NAME_MAX];
    cl_fw_set_name(vm, vm->gen, e, fam, name);
    /* Flush: a DELSETELEM without elements. */
    struct nftnl_set *s = set_obj(&b, NFPROTO_INET, name);
    put_set_msg(&b, NFT_MSG_DELSETELEM, NFPROTO_INET, 0, FW_OBJ_ELEM, name, s);
    nftnl_set_free(s);
    if (b.err) return b.err;
    const fw_addr *lists[1 + FW_MAX_HOSTS];
    size_t counts[1 + FW_MAX_HOSTS];
    int nl = 0;
    lists[nl] = e->addrs;
    counts[nl++] = e->naddrs;
    for (size_t h = 0; h < e->nhosts; h++) {
      lists[nl] = e->hosts[h].addrs;
      counts[nl++] = e->hosts[h].naddrs;
    }
    put_addr_set(&b, name, 0, fam, lists, counts, nl, 0);
    if (b.err) return b.err;
  }
  return 0;
}

int cl_fw_dump_request(fw *f, fw_txn *t, uint16_t type, uint16_t family, const char *chain,
                       const char *set) {
  struct nlmsghdr *nlh = cl_fw_txn_msg(f, t, type, family, NLM_F_DUMP, FW_OBJ_DUMP, -1,
                                       chain ? chain
                                       : set ? set
                                             : f->table);
  if (!nlh) return ENOMEM;
  if (type == NFT_MSG_GETRULE) {
    struct nftnl_rule *r = nftnl_rule_alloc();
    nftnl_rule_set_str(r, NFTNL_RULE_TABLE, f->table);
    if (chain) nftnl_rule_set_str(r, NFTNL_RULE_CHAIN, chain);
    nftnl_rule_nlmsg_build_payload(nlh, r);
    nftnl_rule_free(r);
  } else if (type == NFT_MSG_GETCHAIN) {
    struct nftnl_chain *c = nftnl_chain_alloc();
    nftnl_chain_set_str(c, NFTNL_CHAIN_TABLE, f->table);
    nftnl_chain_nlmsg_build_payload(nlh, c);
    nftnl_chain_free(c);
  } else if (type == NFT_MSG_GETSET) {
    struct nftnl_set *s = nftnl_set_alloc();
    nftnl_set_set_str(s, NFTNL_SET_TABLE, f->table);
    nftnl_set_nlmsg_build_payload(nlh, s);
    nftnl_set_free(s);
  } else if (type == NFT_MSG_GETSETELEM) {
    struct nftnl_set *s = nftnl_set_alloc();
    nftnl_set_set_str(s, NFTNL_SET_TABLE, f->table);
    nftnl_set_set_str(s, NFTNL_SET_NAME, set);
    nftnl_set_elems_nlmsg_build_payload(nlh, s);
    nftnl_set_free(s);
  }
  cl_fw_txn_end_msg(t, nlh);
  return 0;
}

void cl_fw_plan_free(fw_plan *p) {
  if (!p) return;
  for (size_t i = 0; i < p->nentries; i++) {
    fw_entry *e = &p->entries[i];
    free(e->addrs);
    for (size_t h = 0; h < e->nhosts; h++) {
      free(e->hosts[h].name);
      free(e->hosts[h].addrs);
    }
    free(e->hosts);
  }
  free(p->entries);
  free(p);
}
