/*
 * The drop log: drop rules of VMs attached with `log = true` also send the packet's headers to
 * an NFLOG group, with the prefix "clawlua:<vm hash>:<rule label>". A netlink socket bound to
 * that group is read on the loop; each packet becomes an `fw.drop` audit event naming the VM,
 * the rule and the 5-tuple, and is handed to the on_drop callback of `firewall.open`.
 *
 * Memory is bounded: events for the callback wait in a ring of QUEUE_CAP (older ones are
 * counted and dropped when the callback is slower than the traffic), and a kernel that sends
 * faster than we read overflows the socket buffer, which the kernel counts and we report
 * (ENOBUFS) instead of queueing more.
 */
#include "fw.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_log.h>
#include <linux/netlink.h>
#include <netinet/in.h>

#define QUEUE_CAP 1024
#define NFLOG_MT  "clawlua.firewall.nflog"

typedef struct drop_ev {
  char key[FW_HASH_HEX + 1];
  char label[48];
  int family; /* 4, 6, 0 (arp) */
  uint8_t proto;
  char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
  int sport, dport; /* -1: none */
  char mac[18];
  double time;
} drop_ev;

struct fw_nflog {
  fw *f;
  int fd;
  cl_watch watch;
  drop_ev *ring;
  size_t head, count;
  uint64_t received, lost_kernel, lost_queue, foreign;
  int task_pending;
  int has_cb;
  char buf[65536];
};

/* ------------------------------------------------------------------------------------------ */
/* Parsing                                                                                    */

static void parse_l3(drop_ev *ev, int family, const uint8_t *p, size_t n) {
  ev->sport = ev->dport = -1;
  const uint8_t *l4 = NULL;
  size_t l4len = 0;
  if (family == NFPROTO_IPV4 && n >= 20) {
    size_t ihl = (size_t)(p[0] & 15) * 4;
    ev->family = 4;
    ev->proto = p[9];
    inet_ntop(AF_INET, p + 12, ev->src, sizeof ev->src);
    inet_ntop(AF_INET, p + 16, ev->dst, sizeof ev->dst);
    if (ihl >= 20 && n > ihl) {
      l4 = p + ihl;
      l4len = n - ihl;
    }
  } else if (family == NFPROTO_IPV6 && n >= 40) {
    ev->family = 6;
    ev->proto = p[6];
    inet_ntop(AF_INET6, p + 8, ev->src, sizeof ev->src);
    inet_ntop(AF_INET6, p + 24, ev->dst, sizeof ev->dst);
    l4 = p + 40;
    l4len = n - 40;
  } else if (family == NFPROTO_ARP && n >= 28) {
    ev->family = 0;
    inet_ntop(AF_INET, p + 14, ev->src, sizeof ev->src);
    inet_ntop(AF_INET, p + 24, ev->dst, sizeof ev->dst);
  }
  if (l4 && l4len >= 4 && (ev->proto == IPPROTO_TCP || ev->proto == IPPROTO_UDP)) {
    ev->sport = (l4[0] << 8) | l4[1];
    ev->dport = (l4[2] << 8) | l4[3];
  }
}

static int attr_cb(const struct nlattr *a, void *data) {
  const struct nlattr **tb = data;
  int type = mnl_attr_get_type(a);
  if (type <= NFULA_MAX) tb[type] = a;
  return MNL_CB_OK;
}

static void push_event(lua_State *L, const drop_ev *ev, const char *vm) {
  lua_createtable(L, 0, 10);
  if (vm) {
    lua_pushstring(L, vm);
    lua_setfield(L, -2, "vm");
  }
  lua_pushstring(L, ev->label);
  lua_setfield(L, -2, "rule");
  lua_pushstring(L, ev->family == 4 ? "ip" : ev->family == 6 ? "ip6" : "arp");
  lua_setfield(L, -2, "family");
  const char *pn = ev->proto == IPPROTO_TCP      ? "tcp"
                   : ev->proto == IPPROTO_UDP    ? "udp"
                   : ev->proto == IPPROTO_ICMP   ? "icmp"
                   : ev->proto == IPPROTO_ICMPV6 ? "icmpv6"
                                                 : NULL;
  if (pn)
    lua_pushstring(L, pn);
  else
    lua_pushinteger(L, ev->proto);
  lua_setfield(L, -2, "proto");
  lua_pushstring(L, ev->src);
  lua_setfield(L, -2, "src");
  lua_pushstring(L, ev->dst);
  lua_setfield(L, -2, "dst");
  if (ev->sport >= 0) {
    lua_pushinteger(L, ev->sport);
    lua_setfield(L, -2, "sport");
    lua_pushinteger(L, ev->dport);
    lua_setfield(L, -2, "dport");
  }
  if (ev->mac[0]) {
    lua_pushstring(L, ev->mac);
    lua_setfield(L, -2, "mac");
  }
}

/* The task that hands queued events to the callback: a Lua loop over a C iterator, so the
 * callback may wait. */
static int next_event(lua_State *L) {
  fw_nflog *n = lua_touserdata(L, lua_upvalueindex(1));
  if (!n->f || n->count == 0) {
    n->task_pending = 0;
    return 0;
  }
  drop_ev *ev = &n->ring[n->head];
  push_event(L, ev, n->f->vm_id_of(n->f, ev->key));
  n->head = (n->head + 1) % QUEUE_CAP;
  n->count--;
  return 1;
}

static const char DELIVER_SRC[] = "local next_event, cb = ...\n"
                                  "return function() for ev in next_event do cb(ev) end end\n";

static void schedule_delivery(fw_nflog *n) {
  lua_State *L = n->f->L;
  if (n->task_pending || !n->has_cb || !L) return;
  int top = lua_gettop(L);
  if (luaL_loadstring(L, DELIVER_SRC) != LUA_OK) {
    lua_settop(L, top);
    return;
  }
  lua_rawgetp(L, LUA_REGISTRYINDEX, n); /* the nflog userdata */
  lua_pushcclosure(L, next_event, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &n->has_cb); /* the callback */
  lua_call(L, 2, 1);
  cl_task *t = cl_task_spawn(L, 0);
  cl_task_set_daemon(t, 1);
  n->task_pending = 1;
  lua_settop(L, top);
}

static void handle_packet(fw_nflog *n, const struct nlmsghdr *nlh) {
  const struct nlattr *tb[NFULA_MAX + 1] = {0};
  const struct nfgenmsg *g = mnl_nlmsg_get_payload(nlh);
  if (mnl_attr_parse(nlh, sizeof *g, attr_cb, tb) < 0) return;
  n->received++;
  const char *prefix = tb[NFULA_PREFIX] ? mnl_attr_get_str(tb[NFULA_PREFIX]) : "";
  drop_ev ev;
  memset(&ev, 0, sizeof ev);
  if (strncmp(prefix, "clawlua:", 8) != 0 || strlen(prefix) < 8 + FW_HASH_HEX + 1) {
    n->foreign++;
    return;
  }
  memcpy(ev.key, prefix + 8, FW_HASH_HEX);
  snprintf(ev.label, sizeof ev.label, "%s", prefix + 8 + FW_HASH_HEX + 1);
  if (tb[NFULA_PAYLOAD])
    parse_l3(&ev, g->nfgen_family, mnl_attr_get_payload(tb[NFULA_PAYLOAD]),
             mnl_attr_get_payload_len(tb[NFULA_PAYLOAD]));
  if (tb[NFULA_HWADDR] && mnl_attr_get_payload_len(tb[NFULA_HWADDR]) >= 4 + 6) {
    const struct nfulnl_msg_packet_hw *hw = mnl_attr_get_payload(tb[NFULA_HWADDR]);
    if (ntohs(hw->hw_addrlen) == 6)
      snprintf(ev.mac, sizeof ev.mac, "%02x:%02x:%02x:%02x:%02x:%02x", hw->hw_addr[0],
               hw->hw_addr[1], hw->hw_addr[2], hw->hw_addr[3], hw->hw_addr[4], hw->hw_addr[5]);
  }
  fw *f = n->f;
  lua_State *L = f->L;
  if (L) {
    int top = lua_gettop(L);
    push_event(L, &ev, NULL);
    cl_audit_emit(L, "fw.drop", f->vm_id_of(f, ev.key), 0, lua_gettop(L));
    lua_settop(L, top);
  }
  if (!n->has_cb) return;
  if (n->count == QUEUE_CAP) { /* the callback is behind: drop the oldest */
    n->head = (n->head + 1) % QUEUE_CAP;
    n->count--;
    n->lost_queue++;
  }
  n->ring[(n->head + n->count) % QUEUE_CAP] = ev;
  n->count++;
  schedule_delivery(n);
}

static void on_readable(cl_watch *w, uint32_t events) {
  fw_nflog *n = w->data;
  for (int rounds = 0; rounds < 64 && n->f; rounds++) {
    ssize_t r = recv(n->fd, n->buf, sizeof n->buf, MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOBUFS) { /* the kernel dropped log messages: count and go on */
        n->lost_kernel++;
        continue;
      }
      return;
    }
    const struct nlmsghdr *nlh = (const struct nlmsghdr *)n->buf;
    int len = (int)r;
    while (mnl_nlmsg_ok(nlh, len) && n->f) {
      if (nlh->nlmsg_type == ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)) handle_packet(n, nlh);
      nlh = mnl_nlmsg_next(nlh, &len);
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Set-up                                                                                     */

static int config(int fd, uint16_t group, int cmd, int with_mode, char *err, size_t errlen) {
  char buf[256] = {0}; /* the message's alignment padding is sent as it is */
  struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
  nlh->nlmsg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
  nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
  nlh->nlmsg_seq = 1;
  struct nfgenmsg *g = mnl_nlmsg_put_extra_header(nlh, sizeof *g);
  g->nfgen_family = AF_UNSPEC;
  g->version = NFNETLINK_V0;
  g->res_id = htons(group);
  struct nfulnl_msg_config_cmd c = {.command = (uint8_t)cmd};
  mnl_attr_put(nlh, NFULA_CFG_CMD, sizeof c, &c);
  if (with_mode) {
    struct nfulnl_msg_config_mode m = {.copy_range = htonl(128), .copy_mode = NFULNL_COPY_PACKET};
    mnl_attr_put(nlh, NFULA_CFG_MODE, sizeof m, &m);
    /* Deliver within 50 ms, or as soon as 16 packets are waiting. */
    mnl_attr_put_u32(nlh, NFULA_CFG_TIMEOUT, htonl(5));
    mnl_attr_put_u32(nlh, NFULA_CFG_QTHRESH, htonl(16));
  }
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
  if (sendto(fd, buf, nlh->nlmsg_len, 0, (struct sockaddr *)&sa, sizeof sa) < 0) {
    snprintf(err, errlen, "nflog config: %s", strerror(errno));
    return errno;
  }
  /* The kernel handles the message inside sendmsg: its ack is queued already. */
  char rb[1024];
  ssize_t r = recv(fd, rb, sizeof rb, MSG_DONTWAIT);
  if (r > 0) {
    const struct nlmsghdr *h = (const struct nlmsghdr *)rb;
    if (h->nlmsg_type == NLMSG_ERROR) {
      const struct nlmsgerr *e = mnl_nlmsg_get_payload(h);
      if (e->error) {
        if (-e->error == EPERM || -e->error == EBUSY)
          snprintf(err, errlen, "nflog group %d is taken by another listener (%s)", group,
                   strerror(-e->error));
        else
          snprintf(err, errlen, "nflog group %d: %s", group, strerror(-e->error));
        return -e->error;
      }
    }
  }
  return 0;
}

static int nflog_gc(lua_State *L) {
  fw_nflog *n = lua_touserdata(L, 1);
  free(n->ring);
  n->ring = NULL;
  return 0;
}

int cl_fw_nflog_start(fw *f, int fd, int group, char *err, size_t errlen) {
  lua_State *L = f->L;
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    snprintf(err, errlen, "bind nflog socket: %s", strerror(errno));
    close(fd);
    return errno;
  }
  int e = config(fd, (uint16_t)group, NFULNL_CFG_CMD_BIND, 1, err, errlen);
  if (e) {
    close(fd);
    return e;
  }
  int rcv = 4 << 20; /* bursts of logged drops wait here; beyond, the kernel drops them */
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) != 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);

  fw_nflog *n = lua_newuserdatauv(L, sizeof *n, 0);
  memset(n, 0, sizeof *n);
  n->fd = -1;
  static const cl_class cls = {NFLOG_MT, NULL, nflog_gc, NULL};
  cl_class_register(L, &cls);
  luaL_setmetatable(L, NFLOG_MT);
  n->ring = calloc(QUEUE_CAP, sizeof *n->ring);
  if (!n->ring) {
    lua_pop(L, 1);
    close(fd);
    snprintf(err, errlen, "out of memory");
    return ENOMEM;
  }
  e = cl_watch_start(f->loop, &n->watch, fd, EPOLLIN, on_readable);
  if (e) {
    lua_pop(L, 1);
    close(fd);
    snprintf(err, errlen, "watch nflog socket: %s", strerror(e));
    return e;
  }
  n->watch.data = n;
  n->fd = fd;
  n->f = f;
  /* Anchored while the firewall is open; the delivery task's closure keeps it after that. */
  lua_rawsetp(L, LUA_REGISTRYINDEX, n);
  f->nflog = n;
  return 0;
}

/* The on_drop callback is the firewall userdata's user value 1. */
void cl_fw_nflog_set_callback(fw *f, lua_State *L, int fwidx) {
  fw_nflog *n = f->nflog;
  if (!n) return;
  lua_getiuservalue(L, fwidx, 1);
  n->has_cb = lua_isfunction(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &n->has_cb);
}

void cl_fw_nflog_stop(fw *f) {
  fw_nflog *n = f->nflog;
  if (!n) return;
  f->nflog = NULL;
  cl_watch_stop(&n->watch);
  if (n->fd >= 0) {
    char err[64];
    config(n->fd, (uint16_t)f->log_group, NFULNL_CFG_CMD_UNBIND, 0, err, sizeof err);
    close(n->fd);
  }
  n->fd = -1;
  n->f = NULL;
  n->count = 0;
  lua_State *L = f->L;
  if (L) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &n->has_cb);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, n);
  }
}

int cl_fw_nflog_stats(fw *f, lua_State *L) {
  fw_nflog *n = f->nflog;
  if (!n) return 0;
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)n->received);
  lua_setfield(L, -2, "received");
  lua_pushinteger(L, (lua_Integer)n->lost_kernel);
  lua_setfield(L, -2, "lost_kernel");
  lua_pushinteger(L, (lua_Integer)n->lost_queue);
  lua_setfield(L, -2, "lost_queue");
  lua_pushinteger(L, (lua_Integer)n->count);
  lua_setfield(L, -2, "queued");
  lua_setfield(L, -2, "log");
  return 0;
}
