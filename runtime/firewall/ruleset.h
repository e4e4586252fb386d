/*
 * Private header of the ruleset builder (ruleset.c: names, nf_tables expressions and messages,
 * address sets, the base ruleset; ruleset_vm.c: a VM's chains and rules from its plan, which
 * uses the builders of ruleset.c and nothing above).
 */
#ifndef CLAWLUA_FW_RULESET_H
#define CLAWLUA_FW_RULESET_H

#include "fw.h"

#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>

#define PRIO_SPOOF  (-300) /* NF_IP_PRI_RAW: before conntrack */
#define PRIO_FILTER (-10)  /* just before the usual filter priority 0 */
/* nftables' own data type numbers, so that `nft list` prints our maps and sets readably. */
#define TYPE_IPADDR   7
#define TYPE_IP6ADDR  8
#define TYPE_IFNAME   41
#define ELEMS_PER_MSG 512
#define CT_EST_REL    ((1u << 1) | (1u << 2)) /* NF_CT_STATE_BIT(ESTABLISHED) | RELATED */
#define CT_INVALID    1u

extern const char *const cl_fw_maps[3]; /* "spoof", "egress", "ingress" */
#define MAPS cl_fw_maps

typedef struct build {
  fw *f;
  fw_txn *t;
  int vm;          /* index of the VM id in the transaction */
  const char *key; /* the VM's hash, for log prefixes */
  const fw_plan *p;
  int err;
} build;

typedef struct ival {
  uint8_t lo[16], hi[16]; /* inclusive */
} ival;

void cl_fw_chain_name(const char *base, char suffix, char *out);
void cl_fw_add(struct nftnl_rule *r, struct nftnl_expr *e);
void cl_fw_x_meta(struct nftnl_rule *r, uint32_t key);
void cl_fw_x_cmp(struct nftnl_rule *r, uint32_t op, const void *data, uint32_t len);
void cl_fw_x_payload(struct nftnl_rule *r, uint32_t base, uint32_t off, uint32_t len);
void cl_fw_x_bitwise(struct nftnl_rule *r, const void *mask, const void * xor, uint32_t len);
void cl_fw_x_lookup(struct nftnl_rule *r, const char *set, uint32_t set_id, int verdict_map);
void cl_fw_x_range(struct nftnl_rule *r, uint16_t from, uint16_t to);
void cl_fw_x_ct_state(struct nftnl_rule *r, uint32_t bits);
void cl_fw_x_limit(struct nftnl_rule *r, uint64_t rate, uint64_t burst, int bytes, int over);
void cl_fw_x_counter(struct nftnl_rule *r);
void cl_fw_x_log(struct nftnl_rule *r, int group, const char *key, const char *label);
void cl_fw_x_verdict(struct nftnl_rule *r, int verdict);
void cl_fw_x_nfproto(struct nftnl_rule *r, int fam);
void cl_fw_x_l4proto(struct nftnl_rule *r, uint8_t proto);
void cl_fw_put_rule(build *b, uint16_t family, const char *chain, const char *label,
                    struct nftnl_rule *r);
void cl_fw_put_chain(build *b, uint16_t type, uint16_t family, const char *name, int hook, int prio,
                     uint16_t flags, const char *comment);
struct nftnl_set *cl_fw_set_obj(build *b, uint16_t family, const char *name);
void cl_fw_put_set_msg(build *b, uint16_t type, uint16_t family, uint16_t flags, uint8_t kind,
                       const char *name, struct nftnl_set *s);
void cl_fw_put_map_elem(build *b, uint16_t family, const char *map, const char *iface,
                        const char *chain, int del);
void cl_fw_to_ival(const fw_addr *a, int len, ival *v);
void cl_fw_put_addr_set(build *b, const char *name, uint32_t set_id, int fam,
                        const fw_addr *const *lists, const size_t *counts, int nlists, int create);
void cl_fw_del_set(build *b, const char *name);

#endif
