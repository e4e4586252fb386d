/*
 * A VM's chains and rules, compiled from its plan: anti-spoofing, egress and ingress entries
 * (inline matches or address sets), rates, drop logging, ARP. See ruleset.c for the layout.
 */
#include "ruleset.h"

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
      cl_fw_x_limit(logr, p->log_rate, p->log_burst ? p->log_burst : p->log_rate, 0, 0);
      cl_fw_x_log(logr, b->f->log_group, b->key, label);
      cl_fw_put_rule(b, family, chain, NULL, logr);
    } else {
      nftnl_rule_free(logr);
    }
  }
  cl_fw_x_counter(r);
  if (logging && !p->log_rate) cl_fw_x_log(r, b->f->log_group, b->key, label);
  cl_fw_x_verdict(r, NF_DROP);
  cl_fw_put_rule(b, family, chain, label, r);
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
  cl_fw_x_counter(r);
  cl_fw_x_verdict(r, NFT_RETURN);
  cl_fw_put_rule(b, NFPROTO_INET, chain, label, r);
}

static void m_none(struct nftnl_rule *r, const void *arg) {
  (void)r, (void)arg;
}

static void m_mac(struct nftnl_rule *r, const void *arg) {
  uint16_t ether = ARPHRD_ETHER;
  cl_fw_x_meta(r, NFT_META_IIFTYPE);
  cl_fw_x_cmp(r, NFT_CMP_EQ, &ether, 2);
  cl_fw_x_payload(r, NFT_PAYLOAD_LL_HEADER, 6, 6);
  cl_fw_x_cmp(r, NFT_CMP_NEQ, arg, 6);
}

static void m_v4(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_nfproto(r, 4);
}
static void m_v6(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_nfproto(r, 6);
}

static void m_v4_not(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_nfproto(r, 4);
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 12, 4);
  cl_fw_x_cmp(r, NFT_CMP_NEQ, arg, 4);
}

static void m_v6_is(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_nfproto(r, 6);
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16);
  cl_fw_x_cmp(r, NFT_CMP_EQ, arg, 16);
}

static void m_v6_linklocal(struct nftnl_rule *r, const void *arg) {
  static const uint8_t mask[2] = {0xff, 0xc0}, ll[2] = {0xfe, 0x80}, zero[2] = {0, 0};
  cl_fw_x_nfproto(r, 6);
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 2);
  cl_fw_x_bitwise(r, mask, zero, 2);
  cl_fw_x_cmp(r, NFT_CMP_EQ, ll, 2);
}

static void m_v6_dad(struct nftnl_rule *r, const void *arg) {
  static const uint8_t any[16] = {0};
  cl_fw_x_nfproto(r, 6);
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16);
  cl_fw_x_cmp(r, NFT_CMP_EQ, any, 16);
  cl_fw_x_l4proto(r, IPPROTO_ICMPV6);
}

static void m_ct(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_ct_state(r, *(const uint32_t *)arg);
}

typedef struct rate_arg {
  uint64_t rate, burst;
  int bytes;
} rate_arg;

static void m_rate(struct nftnl_rule *r, const void *arg) {
  const rate_arg *a = arg;
  cl_fw_x_limit(r, a->rate, a->burst, a->bytes, 1);
}

static void m_nd(struct nftnl_rule *r, const void *arg) {
  uint8_t hl = 255;
  cl_fw_x_nfproto(r, 6);
  cl_fw_x_l4proto(r, IPPROTO_ICMPV6);
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 7, 1);
  cl_fw_x_cmp(r, NFT_CMP_EQ, &hl, 1);
  cl_fw_x_payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1);
  struct nftnl_expr *e = nftnl_expr_alloc("range");
  uint8_t lo = 133, hi = 136; /* router solicitation .. neighbour advertisement */
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_RANGE_OP, NFT_RANGE_EQ);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_FROM_DATA, &lo, 1);
  nftnl_expr_set(e, NFTNL_EXPR_RANGE_TO_DATA, &hi, 1);
  cl_fw_add(r, e);
}

static void m_metadata(struct nftnl_rule *r, const void *arg) {
  struct in_addr md;
  inet_pton(AF_INET, FW_METADATA_ADDR, &md);
  cl_fw_x_nfproto(r, 4);
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 16, 4);
  cl_fw_x_cmp(r, NFT_CMP_EQ, &md, 4);
}

static void m_dns_other(struct nftnl_rule *r, const void *arg) {
  uint8_t proto = *(const uint8_t *)arg;
  cl_fw_x_l4proto(r, proto);
  cl_fw_x_payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
  cl_fw_x_range(r, 53, 53);
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
  if (a->fam) cl_fw_x_nfproto(r, a->fam);
  if (a->set) {
    /* From the VM: match the destination; to the VM: the source. */
    uint32_t off = a->fam == 4 ? (e->dir == FW_EGRESS ? 16 : 12) : (e->dir == FW_EGRESS ? 24 : 8);
    cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, off, a->fam == 4 ? 4 : 16);
    cl_fw_x_lookup(r, a->set, a->set_id, 0);
  } else if (a->cidr) {
    uint32_t len = a->fam == 4 ? 4 : 16;
    uint32_t off = a->fam == 4 ? (e->dir == FW_EGRESS ? 16 : 12) : (e->dir == FW_EGRESS ? 24 : 8);
    ival v;
    cl_fw_to_ival(a->cidr, (int)len, &v);
    if (a->cidr->plen == 0) return; /* the whole family: the nfproto match says it all */
    /* Only the bytes the prefix covers are loaded; a partial last byte is masked. */
    uint32_t n = (a->cidr->plen + 7u) / 8u;
    cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, off, n);
    if (a->cidr->plen % 8) {
      uint8_t mask[16] = {0}, zero[16] = {0};
      for (uint32_t i = 0; i < n; i++) mask[i] = 0xff;
      mask[n - 1] = (uint8_t)(0xff << (8 - a->cidr->plen % 8));
      cl_fw_x_bitwise(r, mask, zero, n);
    }
    cl_fw_x_cmp(r, NFT_CMP_EQ, v.lo, n);
    (void)len;
  }
  if (a->l4) cl_fw_x_l4proto(r, a->l4);
  if (e->pfrom) {
    cl_fw_x_payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
    cl_fw_x_range(r, e->pfrom, e->pto);
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
    cl_fw_put_addr_set(b, names[k], ids[k], fam, lists, counts, nl, 1);
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
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 0, 6);
  cl_fw_x_cmp(r, NFT_CMP_NEQ, want, 6);
}

static void m_arp_sha(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 6);
  cl_fw_x_cmp(r, NFT_CMP_NEQ, arg, 6);
}

static void m_arp_ll(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_payload(r, NFT_PAYLOAD_LL_HEADER, 6, 6);
  cl_fw_x_cmp(r, NFT_CMP_NEQ, arg, 6);
}

static void m_arp_spa(struct nftnl_rule *r, const void *arg) {
  cl_fw_x_payload(r, NFT_PAYLOAD_NETWORK_HEADER, 14, 4);
  cl_fw_x_cmp(r, arg ? NFT_CMP_NEQ : NFT_CMP_EQ, arg ? arg : (const void *)"\0\0\0\0", 4);
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
    cl_fw_x_counter(r);
    cl_fw_x_verdict(r, NFT_RETURN);
    cl_fw_put_rule(b, NFPROTO_ARP, chain, "arp.probe", r);
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
  cl_fw_chain_name(vm->base, 's', cs);
  cl_fw_chain_name(vm->base, 'o', co);
  cl_fw_chain_name(vm->base, 'i', ci);
  cl_fw_chain_name(vm->base, 'a', ca);
  if (!replace) {
    uint16_t fl = NLM_F_CREATE | NLM_F_EXCL;
    cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, cs, -1, 0, fl, vm->id);
    cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, co, -1, 0, fl, vm->id);
    cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_INET, ci, -1, 0, fl, vm->id);
    cl_fw_put_chain(&b, NFT_MSG_NEWCHAIN, NFPROTO_ARP, ca, -1, 0, fl, vm->id);
  } else {
    cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, cs, -1, 0, 0, NULL);
    cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, co, -1, 0, 0, NULL);
    cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_INET, ci, -1, 0, 0, NULL);
    cl_fw_put_chain(&b, NFT_MSG_DELRULE, NFPROTO_ARP, ca, -1, 0, 0, NULL);
    for (size_t i = 0; i < old->nsets; i++) cl_fw_del_set(&b, old->sets[i]);
  }
  spoof_rules(&b, cs);
  direction_rules(&b, vm, vm->gen, FW_EGRESS, co);
  direction_rules(&b, vm, vm->gen, FW_INGRESS, ci);
  arp_rules(&b, ca);
  int moved = replace && strcmp(old->iface, p->iface) != 0;
  if (moved) {
    cl_fw_put_map_elem(&b, NFPROTO_INET, "spoof", old->iface, NULL, 1);
    cl_fw_put_map_elem(&b, NFPROTO_INET, "egress", old->iface, NULL, 1);
    cl_fw_put_map_elem(&b, NFPROTO_INET, "ingress", old->iface, NULL, 1);
    cl_fw_put_map_elem(&b, NFPROTO_ARP, "arp", old->iface, NULL, 1);
  }
  if (!replace || moved) {
    cl_fw_put_map_elem(&b, NFPROTO_INET, "spoof", p->iface, cs, 0);
    cl_fw_put_map_elem(&b, NFPROTO_INET, "egress", p->iface, co, 0);
    cl_fw_put_map_elem(&b, NFPROTO_INET, "ingress", p->iface, ci, 0);
    cl_fw_put_map_elem(&b, NFPROTO_ARP, "arp", p->iface, ca, 0);
  }
  return b.err;
}

int cl_fw_build_detach(fw *f, fw_txn *t, const fw_vm *vm) {
  build b = {.f = f, .t = t};
  b.vm = cl_fw_txn_vm(t, vm->id);
  if (b.vm < 0) return ENOMEM;
  char name[FW_NAME_MAX];
  if (vm->iface[0]) {
    cl_fw_put_map_elem(&b, NFPROTO_INET, "spoof", vm->iface, NULL, 1);
    cl_fw_put_map_elem(&b, NFPROTO_INET, "egress", vm->iface, NULL, 1);
    cl_fw_put_map_elem(&b, NFPROTO_INET, "ingress", vm->iface, NULL, 1);
    cl_fw_put_map_elem(&b, NFPROTO_ARP, "arp", vm->iface, NULL, 1);
  }
  static const char sfx[] = {'s', 'o', 'i'};
  for (size_t i = 0; i < sizeof sfx; i++) {
    cl_fw_chain_name(vm->base, sfx[i], name);
    cl_fw_put_chain(&b, NFT_MSG_DELCHAIN, NFPROTO_INET, name, -1, 0, 0, NULL);
  }
  cl_fw_chain_name(vm->base, 'a', name);
  cl_fw_put_chain(&b, NFT_MSG_DELCHAIN, NFPROTO_ARP, name, -1, 0, 0, NULL);
  for (size_t i = 0; i < vm->nsets; i++) cl_fw_del_set(&b, vm->sets[i]);
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
    struct nftnl_set *s = cl_fw_set_obj(&b, NFPROTO_INET, name);
    cl_fw_put_set_msg(&b, NFT_MSG_DELSETELEM, NFPROTO_INET, 0, FW_OBJ_ELEM, name, s);
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
    cl_fw_put_addr_set(&b, name, 0, fam, lists, counts, nl, 0);
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
