/*
 * A small DNS stub resolver on the loop, for domain names in allow lists. getaddrinfo() blocks
 * and hides TTLs; this sends A and AAAA queries over UDP to the configured resolvers (or those
 * of /etc/resolv.conf), follows CNAME chains in the answer, and reports the addresses with the
 * smallest TTL of the records used, so that the firewall refreshes them when they expire.
 *
 * Sockets are made at firewall.open in the firewall's network namespace and reused; each query
 * has random 16-bit ids and an answer is accepted only from the server it was sent to, for the
 * question that was asked. Attempts rotate over the servers; each gets half the timeout. The
 * answer size is capped by EDNS0 at 1232 bytes; a truncated answer's addresses are used as
 * they are (no TCP fallback).
 */
#include "fw.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_SERVERS 8
#define MAX_QUERIES 256
#define ATTEMPTS    2
#define T_A         1
#define T_CNAME     5
#define T_AAAA      28
#define T_OPT       41

typedef struct query {
  struct query *next;
  fw_dns *d;
  fw_dns_cb cb;
  void *arg;
  char name[256];
  uint16_t id[2]; /* A, AAAA */
  int answered[2];
  int attempt;
  fw_addr addrs[FW_MAX_RESOLVED];
  size_t n;
  uint32_t ttl;
  char err[96];
  cl_timer timer;
} query;

struct fw_dns {
  fw *f;
  int fd[2]; /* AF_INET, AF_INET6 */
  cl_watch w[2];
  struct sockaddr_storage srv[MAX_SERVERS];
  socklen_t srvlen[MAX_SERVERS];
  size_t nsrv;
  query *queries;
  size_t nqueries;
  unsigned char buf[4096];
};

/* ------------------------------------------------------------------------------------------ */
/* Messages                                                                                   */

static size_t build_query(unsigned char *o, uint16_t id, const char *name, uint16_t type) {
  size_t n = 0;
  o[n++] = (uint8_t)(id >> 8);
  o[n++] = (uint8_t)id;
  o[n++] = 0x01; /* RD */
  o[n++] = 0x00;
  o[n++] = 0, o[n++] = 1; /* QDCOUNT */
  o[n++] = 0, o[n++] = 0;
  o[n++] = 0, o[n++] = 0;
  o[n++] = 0, o[n++] = 1; /* ARCOUNT: the OPT record */
  const char *p = name;
  while (*p) {
    const char *dot = strchr(p, '.');
    size_t l = dot ? (size_t)(dot - p) : strlen(p);
    o[n++] = (uint8_t)l;
    memcpy(o + n, p, l);
    n += l;
    p += l;
    if (*p == '.') p++;
  }
  o[n++] = 0;
  o[n++] = (uint8_t)(type >> 8), o[n++] = (uint8_t)type;
  o[n++] = 0, o[n++] = 1; /* IN */
  /* OPT: root name, type 41, UDP payload 1232, no flags */
  o[n++] = 0;
  o[n++] = 0, o[n++] = T_OPT;
  o[n++] = 1232 >> 8, o[n++] = 1232 & 0xff;
  o[n++] = 0, o[n++] = 0, o[n++] = 0, o[n++] = 0;
  o[n++] = 0, o[n++] = 0;
  return n;
}

/* Reads a (possibly compressed) name at off into out (lowercase, dotted). Returns the offset
 * after the name in the message, or -1. */
static long read_name(const unsigned char *m, size_t len, size_t off, char *out, size_t outlen) {
  size_t o = 0, pos = off;
  long after = -1;
  int jumps = 0;
  for (;;) {
    if (pos >= len) return -1;
    unsigned l = m[pos];
    if ((l & 0xc0) == 0xc0) {
      if (pos + 1 >= len || ++jumps > 16) return -1;
      if (after < 0) after = (long)pos + 2;
      pos = ((l & 0x3f) << 8) | m[pos + 1];
      continue;
    }
    if (l & 0xc0) return -1;
    if (l == 0) {
      if (after < 0) after = (long)pos + 1;
      break;
    }
    if (pos + 1 + l > len || o + l + 2 > outlen) return -1;
    if (o) out[o++] = '.';
    for (unsigned i = 0; i < l; i++) out[o++] = (char)tolower(m[pos + 1 + i]);
    pos += 1 + l;
  }
  out[o] = 0;
  return after;
}

static uint16_t get16(const unsigned char *p) {
  return (uint16_t)((p[0] << 8) | p[1]);
}
static uint32_t get32(const unsigned char *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Parses an answer for q (type index k); returns 1 if it was for this query. */
static int parse_answer(query *q, int k, const unsigned char *m, size_t len) {
  if (len < 12) return 0;
  uint16_t flags = get16(m + 2);
  if (!(flags & 0x8000)) return 0;
  unsigned qd = get16(m + 4), an = get16(m + 6);
  size_t off = 12;
  char name[256];
  if (qd != 1) return 0;
  long r = read_name(m, len, off, name, sizeof name);
  if (r < 0 || (size_t)r + 4 > len) return 0;
  if (strcasecmp(name, q->name) != 0) return 0;
  uint16_t qtype = get16(m + r);
  if (qtype != (k == 0 ? T_A : T_AAAA)) return 0;
  off = (size_t)r + 4;
  int rcode = flags & 15;
  q->answered[k] = 1;
  if (rcode == 3) {
    snprintf(q->err, sizeof q->err, "%.60s: no such domain (NXDOMAIN)", q->name);
    return 1;
  }
  if (rcode != 0) {
    if (!q->err[0])
      snprintf(q->err, sizeof q->err, "%.60s: server failure (rcode %d)", q->name, rcode);
    return 1;
  }
  /* The CNAME chain from the question name: records of any name in it count. */
  char chain[8][256];
  int nchain = 1;
  snprintf(chain[0], sizeof chain[0], "%s", q->name);
  for (unsigned i = 0; i < an; i++) {
    r = read_name(m, len, off, name, sizeof name);
    if (r < 0 || (size_t)r + 10 > len) break;
    uint16_t type = get16(m + r);
    uint32_t ttl = get32(m + r + 4);
    uint16_t rdlen = get16(m + r + 8);
    size_t rd = (size_t)r + 10;
    if (rd + rdlen > len) break;
    off = rd + rdlen;
    int inchain = 0;
    for (int c = 0; c < nchain; c++)
      if (strcasecmp(name, chain[c]) == 0) inchain = 1;
    if (!inchain) continue;
    if (ttl > 0x7fffffff) ttl = 0;
    if (type == T_CNAME && nchain < 8) {
      if (read_name(m, len, rd, chain[nchain], sizeof chain[nchain]) > 0) nchain++;
      if (ttl < q->ttl) q->ttl = ttl;
    } else if ((type == T_A && rdlen == 4) || (type == T_AAAA && rdlen == 16)) {
      if (q->n < FW_MAX_RESOLVED) {
        fw_addr *a = &q->addrs[q->n++];
        memset(a, 0, sizeof *a);
        a->fam = type == T_A ? 4 : 6;
        a->plen = type == T_A ? 32 : 128;
        memcpy(a->a, m + rd, rdlen);
      }
      if (ttl < q->ttl) q->ttl = ttl;
    }
  }
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Queries                                                                                    */

static void unlink_query(fw_dns *d, query *q) {
  for (query **p = &d->queries; *p; p = &(*p)->next)
    if (*p == q) {
      *p = q->next;
      d->nqueries--;
      break;
    }
  cl_timer_stop(&q->timer);
}

static void finish(fw_dns *d, query *q) {
  unlink_query(d, q);
  fw *f = d->f;
  if (q->n > 0)
    q->cb(f, q->arg, q->name, q->addrs, q->n, q->ttl, NULL);
  else
    q->cb(f, q->arg, q->name, NULL, 0, 0, q->err[0] ? q->err : "no addresses");
  free(q);
}

static void on_timeout(cl_timer *t);

static int send_attempt(fw_dns *d, query *q) {
  size_t s = (size_t)q->attempt % d->nsrv;
  int fam = d->srv[s].ss_family == AF_INET ? 0 : 1;
  if (d->fd[fam] < 0) return EAFNOSUPPORT;
  unsigned char pkt[300];
  for (int k = 0; k < 2; k++) {
    if (q->answered[k]) continue;
    uint16_t id;
    if (getrandom(&id, sizeof id, 0) != sizeof id) id = (uint16_t)cl_now_ns();
    q->id[k] = id;
    size_t n = build_query(pkt, id, q->name, k == 0 ? T_A : T_AAAA);
    if (sendto(d->fd[fam], pkt, n, 0, (struct sockaddr *)&d->srv[s], d->srvlen[s]) < 0 &&
        errno != EAGAIN)
      return errno;
  }
  double per = d->f->dns_timeout / ATTEMPTS;
  cl_timer_start(d->f->loop, &q->timer, cl_now_ns() + (uint64_t)(per * 1e9), on_timeout);
  return 0;
}

static void on_timeout(cl_timer *t) {
  query *q = (query *)((char *)t - offsetof(query, timer));
  fw_dns *d = q->d;
  if (++q->attempt >= ATTEMPTS || q->n > 0) {
    if (!q->err[0] && q->n == 0) snprintf(q->err, sizeof q->err, "%.60s: timed out", q->name);
    finish(d, q);
    return;
  }
  if (send_attempt(d, q) != 0) finish(d, q);
}

static int same_server(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET) {
    struct sockaddr_in x, y;
    memcpy(&x, a, sizeof x);
    memcpy(&y, b, sizeof y);
    return memcmp(&x.sin_port, &y.sin_port, 2) == 0 && memcmp(&x.sin_addr, &y.sin_addr, 4) == 0;
  }
  struct sockaddr_in6 x, y;
  memcpy(&x, a, sizeof x);
  memcpy(&y, b, sizeof y);
  return memcmp(&x.sin6_port, &y.sin6_port, 2) == 0 && memcmp(&x.sin6_addr, &y.sin6_addr, 16) == 0;
}

static void on_readable(cl_watch *w, uint32_t events) {
  fw_dns *d = w->data;
  for (int rounds = 0; rounds < 64; rounds++) {
    struct sockaddr_storage from = {0};
    socklen_t fl = sizeof from;
    ssize_t n = recvfrom(w->fd, d->buf, sizeof d->buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (n < 12) continue;
    uint16_t id = get16(d->buf);
    for (query *q = d->queries; q; q = q->next) {
      size_t s = (size_t)q->attempt % d->nsrv;
      if (!same_server(&from, &d->srv[s])) continue;
      int k = !q->answered[0] && q->id[0] == id ? 0 : !q->answered[1] && q->id[1] == id ? 1 : -1;
      if (k < 0) continue;
      if (!parse_answer(q, k, d->buf, (size_t)n)) continue;
      if (q->answered[0] && q->answered[1]) finish(d, q);
      break;
    }
  }
}

int cl_fw_dns_query(fw *f, const char *name, fw_dns_cb cb, void *arg) {
  fw_dns *d = f->dns;
  if (!d) return ENOENT;
  if (d->nqueries >= MAX_QUERIES) return EAGAIN;
  query *q = calloc(1, sizeof *q);
  if (!q) return ENOMEM;
  q->d = d;
  q->cb = cb;
  q->arg = arg;
  q->ttl = UINT32_MAX;
  snprintf(q->name, sizeof q->name, "%s", name);
  size_t l = strlen(q->name);
  if (l && q->name[l - 1] == '.') q->name[l - 1] = 0;
  for (char *c = q->name; *c; c++) *c = (char)tolower((unsigned char)*c);
  int e = send_attempt(d, q);
  if (e) {
    cl_timer_stop(&q->timer);
    free(q);
    return e;
  }
  q->next = d->queries;
  d->queries = q;
  d->nqueries++;
  return 0;
}

void cl_fw_dns_cancel(fw *f, void *arg) {
  fw_dns *d = f->dns;
  if (!d) return;
  for (query *q = d->queries, *nx; q; q = nx) {
    nx = q->next;
    if (q->arg == arg) {
      unlink_query(d, q);
      free(q);
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Set-up                                                                                     */

static int add_server(fw_dns *d, const char *spec) {
  if (d->nsrv >= MAX_SERVERS) return 0;
  char host[64];
  int port = 53;
  const char *p = spec;
  if (*p == '[') { /* [v6]:port */
    const char *e = strchr(p, ']');
    if (!e || (size_t)(e - p - 1) >= sizeof host) return 0;
    memcpy(host, p + 1, (size_t)(e - p - 1));
    host[e - p - 1] = 0;
    if (e[1] == ':')
      port = (int)strtol(e + 2, NULL, 10);
    else if (e[1])
      return 0;
  } else {
    snprintf(host, sizeof host, "%s", p);
    char *c = strchr(host, ':');
    if (c && !strchr(c + 1, ':')) { /* one colon: v4:port */
      *c = 0;
      port = (int)strtol(c + 1, NULL, 10);
    }
  }
  if (port < 1 || port > 65535) return 0;
  struct sockaddr_storage *ss = &d->srv[d->nsrv];
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
  if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
    s4->sin_family = AF_INET;
    s4->sin_port = htons((uint16_t)port);
    d->srvlen[d->nsrv++] = sizeof *s4;
  } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons((uint16_t)port);
    d->srvlen[d->nsrv++] = sizeof *s6;
  } else {
    return 0;
  }
  return 1;
}

static void read_resolv_conf(fw_dns *d) {
  FILE *fp = fopen("/etc/resolv.conf", "re");
  if (!fp) return;
  char line[256];
  while (fgets(line, sizeof line, fp)) {
    char addr[128];
    if (sscanf(line, " nameserver %127s", addr) == 1) {
      char *pct = strchr(addr, '%'); /* scoped v6: not supported, skip the scope */
      if (pct) continue;
      add_server(d, addr);
    }
  }
  fclose(fp);
}

int cl_fw_dns_start(fw *f, const int *fds, lua_State *L, int ridx, char *err, size_t errlen) {
  fw_dns *d = calloc(1, sizeof *d);
  if (!d) {
    snprintf(err, errlen, "out of memory");
    return ENOMEM;
  }
  d->f = f;
  d->fd[0] = fds[0];
  d->fd[1] = fds[1];
  if (lua_type(L, ridx) == LUA_TTABLE) {
    lua_Integer n = (lua_Integer)lua_rawlen(L, ridx);
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, ridx, i);
      const char *s = lua_tostring(L, -1);
      if (lua_type(L, -1) != LUA_TSTRING || !add_server(d, s)) {
        snprintf(err, errlen, "bad field 'resolvers[%d]' (invalid resolver address '%s')", (int)i,
                 s ? s : luaL_typename(L, -1));
        lua_pop(L, 1);
        for (int k = 0; k < 2; k++)
          if (d->fd[k] >= 0) close(d->fd[k]);
        free(d);
        return EINVAL;
      }
      lua_pop(L, 1);
    }
  } else {
    read_resolv_conf(d);
  }
  for (int k = 0; k < 2; k++) {
    if (d->fd[k] < 0) continue;
    int e = cl_watch_start(f->loop, &d->w[k], d->fd[k], EPOLLIN, on_readable);
    if (e) {
      close(d->fd[k]);
      d->fd[k] = -1;
      continue;
    }
    d->w[k].data = d;
  }
  if (d->nsrv == 0) { /* no resolver: domain names in specs are refused */
    for (int k = 0; k < 2; k++)
      if (d->fd[k] >= 0) {
        cl_watch_stop(&d->w[k]);
        close(d->fd[k]);
      }
    free(d);
    return 0;
  }
  f->dns = d;
  return 0;
}

void cl_fw_dns_stop(fw *f) {
  fw_dns *d = f->dns;
  if (!d) return;
  f->dns = NULL;
  /* Queries still running belong to calls waiting for them: they end with an error. */
  while (d->queries) {
    query *q = d->queries;
    unlink_query(d, q);
    q->cb(f, q->arg, q->name, NULL, 0, 0, "firewall closed");
    free(q);
  }
  for (int k = 0; k < 2; k++)
    if (d->fd[k] >= 0) {
      cl_watch_stop(&d->w[k]);
      close(d->fd[k]);
    }
  free(d);
}

/* ------------------------------------------------------------------------------------------ */
/* fw:resolve(name) -> { addrs = {...}, ttl = n } | nil, err                                   */

typedef struct rq {
  int done;
  cl_wait *w;
  fw_addr addrs[FW_MAX_RESOLVED];
  size_t n;
  uint32_t ttl;
  char err[128];
  fw *f;
} rq;

static void rq_cb(fw *f, void *arg, const char *name, const fw_addr *addrs, size_t n, uint32_t ttl,
                  const char *err) {
  rq *r = arg;
  r->done = 1;
  if (err) snprintf(r->err, sizeof r->err, "%s", err);
  if (n > FW_MAX_RESOLVED) n = FW_MAX_RESOLVED;
  if (n) memcpy(r->addrs, addrs, n * sizeof *addrs);
  r->n = n;
  r->ttl = ttl;
  if (r->w) {
    cl_wait *w = r->w;
    r->w = NULL;
    cl_wait_wake(w, 0);
  }
}

static int rq_gc(lua_State *L) {
  rq *r = lua_touserdata(L, 1);
  if (!r->done && r->f && r->f->dns) cl_fw_dns_cancel(r->f, r);
  r->done = 1;
  return 0;
}

static void rq_abort(cl_wait *w) {
  rq *r = w->data;
  r->w = NULL;
}

static int resolve_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait_resumed(L, ctx);
  rq *r = lua_touserdata(L, 3);
  fw *f = lua_touserdata(L, 1);
  if (f->closed || !r->done) return cl_failf(L, ECANCELED, "firewall: resolve: closed");
  if (r->err[0]) return cl_failf(L, ENOENT, "firewall: resolve: %s", r->err);
  lua_createtable(L, 0, 2);
  lua_createtable(L, (int)r->n, 0);
  for (size_t i = 0; i < r->n; i++) {
    char s[INET6_ADDRSTRLEN];
    inet_ntop(r->addrs[i].fam == 4 ? AF_INET : AF_INET6, r->addrs[i].a, s, sizeof s);
    lua_pushstring(L, s);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "addrs");
  lua_pushinteger(L, r->ttl);
  lua_setfield(L, -2, "ttl");
  return 1;
}

int cl_fw_resolve(lua_State *L);
int cl_fw_resolve(lua_State *L) {
  fw *f = luaL_checkudata(L, 1, FW_MT);
  if (f->closed) luaL_error(L, "attempt to use a closed firewall");
  const char *name = luaL_checkstring(L, 2);
  lua_settop(L, 2);
  if (!f->dns) return cl_failf(L, ENOENT, "firewall: resolve: no resolvers configured");
  if (strlen(name) > 253 || !*name) luaL_argerror(L, 2, "invalid host name");
  rq *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  r->f = f;
  lua_newtable(L);
  lua_pushcfunction(L, rq_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  int e = cl_fw_dns_query(f, name, rq_cb, r);
  if (e) {
    r->done = 1;
    return cl_fail(L, "firewall: resolve", e);
  }
  cl_wait *w = cl_wait_push(L);
  w->external = 1;
  w->data = r;
  w->on_abort = rq_abort;
  r->w = w;
  return cl_wait_suspend(L, w, resolve_k, lua_gettop(L));
}
