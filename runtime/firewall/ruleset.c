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
#include "ruleset.h"
#include "sha256.h"

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

const char *const cl_fw_maps[3] = {"spoof", "egress", "ingress"};

/* ------------------------------------------------------------------------------------------ */
/* Names                                                                                      */

void cl_fw_vm_names(const char *id, char *key, char *base) {
  unsigned char md[CL_SHA256_LEN];
  cl_sha256(id, strlen(id), md);
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

void cl_fw_chain_name(const char *base, char suffix, char *out) {
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

void cl_fw_add(struct nftnl_rule *r, struct nftnl_expr *e) {
  nftnl_rule_add_expr(r, e);
}

void cl_fw_x_meta(struct nftnl_rule *r, uint32_t key) {
  struct nftnl_expr *e = nftnl_expr_alloc("meta");
  nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
  nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, NFT_REG_1);
  cl_fw_add(r, e);
}

void cl_fw_x_cmp(struct nftnl_rule *r, uint32_t op, const void *data, uint32_t len) {
  struct nftnl_expr *e = nftnl_expr_alloc("cmp");
  nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, op);
  nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, data, len);
  cl_fw_add(r, e);
}

void cl_fw_x_payload(struct nftnl_rule *r, uint32_t base, uint32_t off, uint32_t len) {
  struct nftnl_expr *e = nftnl_expr_alloc("payload");
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, off);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, NFT_REG_1);
  cl_fw_add(r, e);
}

void cl_fw_x_bitwise(struct nftnl_rule *r, const void *mask, const void * xor, uint32_t len) {
  struct nftnl_expr *e = nftnl_expr_alloc("bitwise");
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_DREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_LEN, len);
  nftnl_expr_set(e, NFTNL_EXPR_BITWISE_MASK, mask, len);
  nftnl_expr_set(e, NFTNL_EXPR_BITWISE_XOR, xor, len);
  cl_fw_add(r, e);
}

void cl_fw_x_lookup(struct nftnl_rule *r, const char *set, uint32_t set_id, int verdict_map) {
  struct nftnl_expr *e = nftnl_expr_alloc("lookup");
  nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SREG, NFT_REG_1);
  if (verdict_map) nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_DREG, NFT_REG_VERDICT);
  nftnl_expr_set_str(e, NFTNL_EXPR_LOOKUP_SET, set);
  if (set_id) nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SET_ID, set_id);
  cl_fw_add(r, e);
}

void cl_fw_x_range(struct nftnl_rule *r, uint16_t from, uint16_t to) {
  uint16_t a = htons(from), b = htons(to);
  if (from == to) {
    cl_fw_x_cmp(r, NFT_CMP_EQ, &a, 2);
    return;
  }
  struct nftnl_expr *e = nftnl_expr_alloc("range");
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_OP, NFT_RANGE_EQ);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_FROM_DATA, &a, 2);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_TO_DATA, &b, 2);
  cl_fw_add(r, e);
}

void cl_fw_x_ct_state(struct nftnl_rule *r, uint32_t bits) {
  struct nftnl_expr *e = nftnl_expr_alloc("ct");
  nftnl_expr_set_u32(e, NFTNL_EXPR_CT_KEY, NFT_CT_STATE);
  nftnl_expr_set_u32(e, NFTNL_EXPR_CT_DREG, NFT_REG_1);
  cl_fw_add(r, e);
  uint32_t zero = 0;
  cl_fw_x_bitwise(r, &bits, &zero, 4);
  cl_fw_x_cmp(r, NFT_CMP_NEQ, &zero, 4);
}

void cl_fw_x_limit(struct nftnl_rule *r, uint64_t rate, uint64_t burst, int bytes, int over) {
  struct nftnl_expr *e = nftnl_expr_alloc("limit");
  nftnl_expr_set_u64(e, NFTNL_EXPR_LIMIT_RATE, rate);
  nftnl_expr_set_u64(e, NFTNL_EXPR_LIMIT_UNIT, 1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LIMIT_BURST, (uint32_t)burst);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LIMIT_TYPE, bytes ? NFT_LIMIT_PKT_BYTES : NFT_LIMIT_PKTS);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LIMIT_FLAGS, over ? NFT_LIMIT_F_INV : 0);
  cl_fw_add(r, e);
}

void cl_fw_x_counter(struct nftnl_rule *r) {
  cl_fw_add(r, nftnl_expr_alloc("counter"));
}

void cl_fw_x_log(struct nftnl_rule *r, int group, const char *key, const char *label) {
  char prefix[128];
  snprintf(prefix, sizeof prefix, "clawlua:%s:%s", key, label);
  struct nftnl_expr *e = nftnl_expr_alloc("log");
  nftnl_expr_set_u16(e, NFTNL_EXPR_LOG_GROUP, (uint16_t)group);
  nftnl_expr_set_str(e, NFTNL_EXPR_LOG_PREFIX, prefix);
  nftnl_expr_set_u32(e, NFTNL_EXPR_LOG_SNAPLEN, 128);
  cl_fw_add(r, e);
}

void cl_fw_x_verdict(struct nftnl_rule *r, int verdict) {
  struct nftnl_expr *e = nftnl_expr_alloc("immediate");
  nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT);
  nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_VERDICT, (uint32_t)verdict);
  cl_fw_add(r, e);
}

void cl_fw_x_nfproto(struct nftnl_rule *r, int fam) {
  uint8_t p = fam == 4 ? NFPROTO_IPV4 : NFPROTO_IPV6;
  cl_fw_x_meta(r, NFT_META_NFPROTO);
  cl_fw_x_cmp(r, NFT_CMP_EQ, &p, 1);
}

void cl_fw_x_l4proto(struct nftnl_rule *r, uint8_t proto) {
  cl_fw_x_meta(r, NFT_META_L4PROTO);
  cl_fw_x_cmp(r, NFT_CMP_EQ, &proto, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Messages                                                                                   */

void cl_fw_put_rule(build *b, uint16_t family, const char *chain, const char *label,
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
void cl_fw_put_chain(build *b, uint16_t type, uint16_t family, const char *name, int hook, int prio,
                     uint16_t flags, const char *comment) {
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

struct nftnl_set *cl_fw_set_obj(build *b, uint16_t family, const char *name) {
  struct nftnl_set *s = nftnl_set_alloc();
  nftnl_set_set_str(s, NFTNL_SET_TABLE, b->f->table);
  nftnl_set_set_str(s, NFTNL_SET_NAME, name);
  nftnl_set_set_u32(s, NFTNL_SET_FAMILY, family);
  return s;
}

void cl_fw_put_set_msg(build *b, uint16_t type, uint16_t family, uint16_t flags, uint8_t kind,
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
  struct nftnl_set *s = cl_fw_set_obj(b, family, name);
  nftnl_set_set_u32(s, NFTNL_SET_FLAGS, NFT_SET_MAP);
  nftnl_set_set_u32(s, NFTNL_SET_KEY_TYPE, TYPE_IFNAME);
  nftnl_set_set_u32(s, NFTNL_SET_KEY_LEN, IFNAMSIZ);
  nftnl_set_set_u32(s, NFTNL_SET_DATA_TYPE, NFT_DATA_VERDICT);
  nftnl_set_set_u32(s, NFTNL_SET_ID, ++b->t->set_id);
  set_byteorder(s, 1);
  cl_fw_put_set_msg(b, NFT_MSG_NEWSET, family, NLM_F_CREATE, FW_OBJ_SET, name, s);
  nftnl_set_free(s);
}

/* A map element iface -> jump chain (cl_fw_add), or the removal of iface's element. */
void cl_fw_put_map_elem(build *b, uint16_t family, const char *map, const char *iface,
                        const char *chain, int del) {
  if (b->err) return;
  struct nftnl_set *s = cl_fw_set_obj(b, family, map);
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
  cl_fw_put_set_msg(b, del ? NFT_MSG_DELSETELEM : NFT_MSG_NEWSETELEM, family,
                    del ? 0 : (NLM_F_CREATE | NLM_F_EXCL), FW_OBJ_MAPELEM, what, s);
  nftnl_set_free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* Address sets                                                                               */

static int cmp_ival(const void *a, const void *b) {
  return memcmp(((const ival *)a)->lo, ((const ival *)b)->lo, 16);
}

/* x += 1 over len bytes; returns 1 on overflow. */
static int incr(uint8_t *x, int len) {
  for (int i = len - 1; i >= 0; i--)
    if (++x[i] != 0) return 0;
  return 1;
}

void cl_fw_to_ival(const fw_addr *a, int len, ival *v) {
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
void cl_fw_put_addr_set(build *b, const char *name, uint32_t set_id, int fam,
                        const fw_addr *const *lists, const size_t *counts, int nlists, int create) {
  if (b->err) return;
  int len = fam == 4 ? 4 : 16;
  struct nftnl_set *s;
  if (create) {
    s = cl_fw_set_obj(b, NFPROTO_INET, name);
    nftnl_set_set_u32(s, NFTNL_SET_FLAGS, NFT_SET_INTERVAL);
    nftnl_set_set_u32(s, NFTNL_SET_KEY_TYPE, fam == 4 ? TYPE_IPADDR : TYPE_IP6ADDR);
    nftnl_set_set_u32(s, NFTNL_SET_KEY_LEN, (uint32_t)len);
    nftnl_set_set_u32(s, NFTNL_SET_ID, set_id);
    set_byteorder(s, 2);
    cl_fw_put_set_msg(b, NFT_MSG_NEWSET, NFPROTO_INET, NLM_F_CREATE | NLM_F_EXCL, FW_OBJ_SET, name,
                      s);
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
      if (lists[l][i].fam == fam) cl_fw_to_ival(&lists[l][i], len, &v[n++]);
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
    if (!s) s = cl_fw_set_obj(b, NFPROTO_INET, name);
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
      cl_fw_put_set_msg(b, NFT_MSG_NEWSETELEM, NFPROTO_INET, NLM_F_CREATE, FW_OBJ_ELEM, name, s);
      nftnl_set_free(s);
      s = NULL;
      inmsg = 0;
    }
  }
  if (s) nftnl_set_free(s);
  free(v);
}

void cl_fw_del_set(build *b, const char *name) {
  if (b->err) return;
  struct nftnl_set *s = cl_fw_set_obj(b, NFPROTO_INET, name);
  cl_fw_put_set_msg(b, NFT_MSG_DELSET, NFPROTO_INET, 0, FW_OBJ_SET, name, s);
  nftnl_set_free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* The base ruleset                                                                           */

static void vmap_rule(build *b, uint16_t family, const char *chain, uint32_t meta,
                      const char *map) {
  struct nftnl_rule *r = nftnl_rule_alloc();
  cl_fw_x_meta(r, meta);
  cl_fw_x_lookup(r, map, 0, 1);
  cl_fw_put_rule(b, family, chain, NULL, r);
}

/* Creates what is missing and rewrites the base chains' rules (repairing them if someone
 * edited them), in one batch; VM chains, sets and map elements are left as they are. */
int cl_fw_build_base(fw *f, fw_txn *t) {
  build b = {.f = f, .t = t, .vm = -1};
  put_table(&b, NFPROTO_INET, NFT_MSG_NEWTABLE);
  for (size_t i = 0; i < CL_ARRAY_LEN(MAPS); i++) put_map(&b, NFPROTO_INET, MAPS[i]);
  cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, "prerouting", NF_INET_PRE_ROUTING, PRIO_SPOOF,
                  NLM_F_CREATE, NULL);
  cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, "input", NF_INET_LOCAL_IN, PRIO_FILTER,
                  NLM_F_CREATE, NULL);
  cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, "forward", NF_INET_FORWARD, PRIO_FILTER,
                  NLM_F_CREATE, NULL);
  cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, "prerouting", -1, 0, 0, NULL);
  cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, "input", -1, 0, 0, NULL);
  cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, "forward", -1, 0, 0, NULL);
  vmap_rule(&b, NFPROTO_INET, "prerouting", NFT_META_IIFNAME, "spoof");
  vmap_rule(&b, NFPROTO_INET, "input", NFT_META_IIFNAME, "egress");
  vmap_rule(&b, NFPROTO_INET, "forward", NFT_META_IIFNAME, "egress");
  vmap_rule(&b, NFPROTO_INET, "forward", NFT_META_OIFNAME, "ingress");

  put_table(&b, NFPROTO_ARP, NFT_MSG_NEWTABLE);
  put_map(&b, NFPROTO_ARP, "arp");
  cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_ARP, "input", NF_ARP_IN, 0, NLM_F_CREATE, NULL);
  cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_ARP, "input", -1, 0, 0, NULL);
  vmap_rule(&b, NFPROTO_ARP, "input", NFT_META_IIFNAME, "arp");
  return b.err;
}

int cl_fw_build_delete_table(fw *f, fw_txn *t) {
  build b = {.f = f, .t = t, .vm = -1};
  put_table(&b, NFPROTO_INET, NFT_MSG_DELTABLE);
  put_table(&b, NFPROTO_ARP, NFT_MSG_DELTABLE);
  return b.err;
}
