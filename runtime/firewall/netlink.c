/*
 * Netlink transport of the firewall: the sockets (optionally created inside another network
 * namespace), batches of nf_tables messages sent in one sendmsg, and the replies read on the
 * loop.
 *
 * A request is a transaction (fw_txn): a batch (BEGIN, messages, END) or one dump request.
 * The kernel runs a batch as one transaction: every message applies or none does. Each message
 * carries its own sequence number and a description of the object it touches, so an error the
 * kernel reports against a message is turned into "rule egress.allow[3] of vm 'a1': ...". The
 * END message asks for an acknowledgement, which marks the batch done. Transactions go out one
 * at a time, in submission order; replies are read by a callback watch on the loop, so a batch
 * completes (and the firewall's registry is updated) even when the Lua call that started it
 * was cancelled meanwhile.
 */
#include "fw.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libmnl/libmnl.h>
#include <libnftnl/common.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>

#define MSG_ROOM  65536 /* room guaranteed before each message is written */
#define RBUF_SIZE (1 << 17)

/* ------------------------------------------------------------------------------------------ */
/* Sockets, in the caller's or another network namespace                                       */

typedef struct sock_job {
  const char *netns;
  int *fds;
  const int *types;
  int n;
  int err;
  char msg[160];
} sock_job;

/* Specs of the sockets: netlink protocol numbers, or -AF_INET / -AF_INET6 for UDP. */
static int make_socket(int type) {
  if (type >= 0) return socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, type);
  return socket(-type, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

static void *sock_thread(void *arg) {
  sock_job *j = arg;
  if (j->netns) {
    int nsfd = open(j->netns, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) {
      j->err = errno;
      snprintf(j->msg, sizeof j->msg, "open %s: %s", j->netns, strerror(errno));
      return NULL;
    }
    /* Only this thread moves: the loop's thread stays in its namespace. A socket keeps the
     * namespace it was created in for its whole life. */
    if (setns(nsfd, CLONE_NEWNET) != 0) {
      j->err = errno;
      snprintf(j->msg, sizeof j->msg, "setns %s: %s", j->netns, strerror(errno));
      close(nsfd);
      return NULL;
    }
    close(nsfd);
  }
  for (int i = 0; i < j->n; i++) {
    j->fds[i] = make_socket(j->types[i]);
    if (j->fds[i] < 0 && j->types[i] >= 0) { /* UDP of a missing family is optional */
      j->err = errno;
      snprintf(j->msg, sizeof j->msg, "socket: %s", strerror(errno));
      for (int k = 0; k < i; k++)
        if (j->fds[k] >= 0) close(j->fds[k]);
      return NULL;
    }
  }
  return NULL;
}

int cl_fw_open_sockets(const char *netns, int *fds, const int *types, int n, char *err,
                       size_t errlen) {
  sock_job j = {.netns = netns, .fds = fds, .types = types, .n = n};
  for (int i = 0; i < n; i++) fds[i] = -1;
  if (!netns) {
    sock_thread(&j);
  } else {
    pthread_t th;
    int e = pthread_create(&th, NULL, sock_thread, &j);
    if (e) {
      snprintf(err, errlen, "pthread_create: %s", strerror(e));
      return e;
    }
    pthread_join(th, NULL);
  }
  if (j.err) snprintf(err, errlen, "%s", j.msg);
  return j.err;
}

int cl_fw_nl_setup(fw *f, int fd, char *err, size_t errlen) {
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    snprintf(err, errlen, "bind netlink: %s", strerror(errno));
    return errno;
  }
  socklen_t sl = sizeof sa;
  if (getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
    snprintf(err, errlen, "getsockname: %s", strerror(errno));
    return errno;
  }
  int one = 1;
  /* Errors carry only the header of the refused message (enough to find its description), and
   * the kernel's extended reason when it has one. */
  setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
  setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
  int rcv = 4 << 20;
  /* Test seam (not part of the module): a receive buffer this small, so that the replies of a
   * refused batch overflow it (ENOBUFS) as they would under memory pressure. */
  const char *tiny = getenv("CLAWLUA_TEST_FW_RCVBUF");
  if (tiny) {
    char *end = NULL;
    long n = strtol(tiny, &end, 10);
    if (end != tiny && *end == '\0' && n > 0 && n < rcv) rcv = (int)n;
  }
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) != 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
  f->nl_fd = fd;
  f->portid = sa.nl_pid;
  f->seq = (uint32_t)cl_now_ns();
  f->rbuf = malloc(RBUF_SIZE);
  if (!f->rbuf) {
    snprintf(err, errlen, "out of memory");
    return ENOMEM;
  }
  int e = cl_watch_start(f->loop, &f->nl_watch, fd, EPOLLIN, cl_fw_on_readable);
  if (e) {
    snprintf(err, errlen, "watch netlink socket: %s", strerror(e));
    return e;
  }
  f->nl_watch.data = f;
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Transactions                                                                               */

fw_txn *cl_fw_txn_new(int is_dump) {
  fw_txn *t = calloc(1, sizeof *t);
  if (t) t->is_dump = is_dump;
  return t;
}

void cl_fw_txn_free(fw_txn *t) {
  if (!t) return;
  free(t->buf);
  free(t->desc);
  for (size_t i = 0; i < t->nids; i++) free(t->ids[i]);
  free(t->ids);
  free(t);
}

int cl_fw_txn_vm(fw_txn *t, const char *id) {
  if (t->nids > 0 && strcmp(t->ids[t->nids - 1], id) == 0) return (int)t->nids - 1;
  if (t->nids == t->idcap) {
    size_t c = t->idcap ? t->idcap * 2 : 8;
    char **n = realloc(t->ids, c * sizeof *n);
    if (!n) return -1;
    t->ids = n;
    t->idcap = c;
  }
  char *s = strdup(id);
  if (!s) return -1;
  t->ids[t->nids++] = s;
  return (int)t->nids - 1;
}

static int reserve(fw_txn *t, size_t room) {
  if (t->cap - t->len >= room) return 1;
  size_t c = t->cap ? t->cap : 1 << 16;
  while (c - t->len < room) c *= 2;
  char *b = realloc(t->buf, c);
  if (!b) return 0;
  /* Zeroed: the alignment padding after each message is sent as it is. */
  memset(b + t->cap, 0, c - t->cap);
  t->buf = b;
  t->cap = c;
  return 1;
}

/* Starts a message at the end of the buffer with the next sequence number and records what it
 * is about. Returns NULL when out of memory. Call cl_fw_txn_end_msg once the payload is in. */
struct nlmsghdr *cl_fw_txn_msg(fw *f, fw_txn *t, uint16_t type, uint16_t family, uint16_t flags,
                               uint8_t kind, int vm, const char *name) {
  if (!reserve(t, MSG_ROOM)) return NULL;
  if (t->ndesc == t->desccap) {
    size_t c = t->desccap ? t->desccap * 2 : 64;
    fw_desc *d = realloc(t->desc, c * sizeof *d);
    if (!d) return NULL;
    t->desc = d;
    t->desccap = c;
  }
  uint32_t seq = ++f->seq;
  if (t->ndesc == 0) t->seq0 = seq;
  fw_desc *d = &t->desc[t->ndesc++];
  d->kind = kind;
  d->vm = vm;
  snprintf(d->name, sizeof d->name, "%s", name ? name : "");
  struct nlmsghdr *nlh = nftnl_nlmsg_build_hdr(t->buf + t->len, type, family, flags, seq);
  return nlh;
}

void cl_fw_txn_end_msg(fw_txn *t, struct nlmsghdr *nlh) {
  t->len += NLMSG_ALIGN(nlh->nlmsg_len);
}

/* A batch is framed by BEGIN and END messages of the nfnetlink subsystem. */
int cl_fw_txn_begin(fw *f, fw_txn *t) {
  if (!reserve(t, MSG_ROOM)) return ENOMEM;
  t->seq_begin = ++f->seq;
  struct nlmsghdr *nlh = nftnl_batch_begin(t->buf + t->len, t->seq_begin);
  t->len += NLMSG_ALIGN(nlh->nlmsg_len);
  return 0;
}

int cl_fw_txn_finish(fw *f, fw_txn *t) {
  if (!reserve(t, MSG_ROOM)) return ENOMEM;
  t->seq_end = ++f->seq;
  struct nlmsghdr *nlh = nftnl_batch_end(t->buf + t->len, t->seq_end);
  /* The acknowledgement of END tells that the kernel went through the whole batch. */
  nlh->nlmsg_flags |= NLM_F_ACK;
  t->len += NLMSG_ALIGN(nlh->nlmsg_len);
  return 0;
}

static const char *kind_name(uint8_t k) {
  switch (k) {
  case FW_OBJ_TABLE:
    return "table";
  case FW_OBJ_CHAIN:
    return "chain";
  case FW_OBJ_SET:
    return "set";
  case FW_OBJ_ELEM:
    return "elements of set";
  case FW_OBJ_MAPELEM:
    return "map element";
  case FW_OBJ_RULE:
    return "rule";
  case FW_OBJ_FLUSH:
    return "flush of chain";
  case FW_OBJ_DUMP:
    return "listing of";
  default:
    return "batch";
  }
}

static void record_error(fw_txn *t, uint32_t seq, int err, const char *extmsg) {
  if (t->err) return; /* the first refused message is the cause; later ones follow from it */
  t->err = err;
  const fw_desc *d = NULL;
  if (seq >= t->seq0 && seq - t->seq0 < t->ndesc) d = &t->desc[seq - t->seq0];
  char what[256];
  if (!d) {
    snprintf(what, sizeof what, "batch");
  } else if (d->vm >= 0 && (size_t)d->vm < t->nids) {
    snprintf(what, sizeof what, "%s %s%s%s of vm '%s'", kind_name(d->kind), d->name[0] ? "'" : "",
             d->name, d->name[0] ? "'" : "", t->ids[d->vm]);
  } else {
    snprintf(what, sizeof what, "%s '%s'", kind_name(d->kind), d->name);
  }
  if (extmsg && *extmsg)
    snprintf(t->errmsg, sizeof t->errmsg, "%s: %s (%s)", what, strerror(err), extmsg);
  else
    snprintf(t->errmsg, sizeof t->errmsg, "%s: %s", what, strerror(err));
}

static void complete(fw *f, fw_txn *t) {
  t->done = 1;
  if (f->inflight == t) f->inflight = NULL;
  if (t->on_done) t->on_done(f, t);
  if (t->waiter) {
    cl_wait *w = t->waiter;
    t->waiter = NULL;
    cl_wait_wake(w, 0);
  } else if (t->orphan) {
    cl_fw_txn_free(t);
  }
}

/* Extended ack: the kernel's human-readable reason, if any. */
static const char *ext_msg(const struct nlmsghdr *nlh) {
  if (!(nlh->nlmsg_flags & NLM_F_ACK_TLVS)) return NULL;
  const struct nlmsgerr *e = mnl_nlmsg_get_payload(nlh);
  size_t off = sizeof *e;
  if (!(nlh->nlmsg_flags & NLM_F_CAPPED)) off += e->msg.nlmsg_len - sizeof(struct nlmsghdr);
  const struct nlattr *a;
  mnl_attr_for_each(a, nlh, off) {
    if (mnl_attr_get_type(a) == NLMSGERR_ATTR_MSG) return mnl_attr_get_str(a);
  }
  return NULL;
}

/* Handles one message from the kernel for the transaction in flight. */
static void handle(fw *f, const struct nlmsghdr *nlh) {
  fw_txn *t = f->inflight;
  if (!t) return; /* a late reply of a transaction given up at close */
  uint32_t first = t->is_dump ? t->seq0 : t->seq_begin;
  uint32_t last = t->is_dump ? t->seq0 : t->seq_end;
  if (nlh->nlmsg_seq < first || nlh->nlmsg_seq > last) return;
  if (nlh->nlmsg_type == NLMSG_ERROR) {
    const struct nlmsgerr *e = mnl_nlmsg_get_payload(nlh);
    if (e->error != 0) record_error(t, e->msg.nlmsg_seq, -e->error, ext_msg(nlh));
    if (e->msg.nlmsg_seq == t->seq_end && !t->is_dump) {
      t->end_acked = 1;
      complete(f, t);
    } else if (t->is_dump && e->error != 0) {
      complete(f, t);
    }
    return;
  }
  if (nlh->nlmsg_type == NLMSG_DONE) {
    if (t->is_dump) complete(f, t);
    return;
  }
  if (t->is_dump && t->on_msg && !t->err) {
    int r = t->on_msg(nlh, t->arg);
    if (r < 0) record_error(t, t->seq0, -r, NULL);
  }
}

/* Reads every queued message; returns when the socket is empty. */
static void drain(fw *f) {
  for (;;) {
    ssize_t n = recv(f->nl_fd, f->rbuf, RBUF_SIZE, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return;
      /* ENOBUFS: replies were lost; those queued before the overflow are still to be read. A
       * batch that applies answers with one END acknowledgement into an empty socket, so a
       * batch's replies overflow only when it was refused (pump decides once they are read). */
      if (errno == ENOBUFS && f->inflight && !f->inflight->is_dump) {
        f->inflight->overrun = 1;
        continue;
      }
      if (f->inflight) {
        record_error(f->inflight, 0, errno, "replies lost");
        complete(f, f->inflight);
      }
      continue;
    }
    if (n == 0) return;
    const struct nlmsghdr *nlh = (const struct nlmsghdr *)f->rbuf;
    int len = (int)n;
    while (mnl_nlmsg_ok(nlh, len)) {
      handle(f, nlh);
      nlh = mnl_nlmsg_next(nlh, &len);
    }
  }
}

static int send_txn(fw *f, fw_txn *t) {
  /* A batch is one netlink message stream in one skb: the send buffer must hold all of it. */
  int need = (int)(t->len + 4096);
  if (need > (1 << 18)) {
    if (setsockopt(f->nl_fd, SOL_SOCKET, SO_SNDBUFFORCE, &need, sizeof need) != 0)
      setsockopt(f->nl_fd, SOL_SOCKET, SO_SNDBUF, &need, sizeof need);
    /* Replies are at most one error per message plus the END ack. */
    int rcv = (int)(t->ndesc * 1024 + (4 << 20));
    if (setsockopt(f->nl_fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) != 0)
      setsockopt(f->nl_fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
  }
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
  for (;;) {
    ssize_t n = sendto(f->nl_fd, t->buf, t->len, 0, (struct sockaddr *)&sa, sizeof sa);
    if (n >= 0) break;
    if (errno == EINTR) continue;
    return errno;
  }
  f->batches++;
  f->messages += t->ndesc;
  return 0;
}

static void pump(fw *f) {
  while (!f->inflight && f->qhead) {
    fw_txn *t = f->qhead;
    f->qhead = t->next;
    if (!f->qhead) f->qtail = NULL;
    t->next = NULL;
    f->inflight = t;
    t->sent = 1;
    int e = send_txn(f, t);
    if (e) {
      record_error(t, 0, e, "sendmsg");
      snprintf(t->errmsg, sizeof t->errmsg, "netlink send: %s", strerror(e));
      complete(f, t);
      continue;
    }
    /* The kernel runs a batch inside sendmsg (nfnetlink_rcv in the sender's context), so
     * every reply to it is queued when sendmsg returns: once they are read, the batch is done.
     * The END acknowledgement says so explicitly on success; a refused batch is aborted
     * without one. Dumps are produced as we read them, and may continue on the loop. */
    drain(f);
    if (f->inflight == t && !t->is_dump) {
      /* Overflowed: the first replies were queued (netlink queues a message into an empty
       * socket whatever its size), and the first error is the cause: record_error kept it. */
      if (t->overrun) f->overruns++;
      if (t->overrun && !t->err && !t->end_acked)
        record_error(t, 0, ENOBUFS, "the kernel refused the batch; its replies were lost");
      complete(f, t);
    }
  }
}

void cl_fw_submit(fw *f, fw_txn *t) {
  t->next = NULL;
  if (f->qtail)
    f->qtail->next = t;
  else
    f->qhead = t;
  f->qtail = t;
  pump(f);
}

void cl_fw_on_readable(cl_watch *w, uint32_t events) {
  fw *f = w->data;
  drain(f);
  pump(f);
}

/* Close: what is queued or in flight completes with ECANCELED. */
void cl_fw_abort_all(fw *f) {
  while (f->inflight || f->qhead) {
    fw_txn *t = f->inflight;
    if (t) {
      f->inflight = NULL;
    } else {
      t = f->qhead;
      f->qhead = t->next;
      if (!f->qhead) f->qtail = NULL;
    }
    if (!t->err) {
      t->err = ECANCELED;
      snprintf(t->errmsg, sizeof t->errmsg, "firewall closed");
    }
    t->done = 1;
    if (t->on_done) t->on_done(f, t);
    if (t->waiter) {
      cl_wait *wt = t->waiter;
      t->waiter = NULL;
      cl_wait_wake(wt, ECANCELED);
    } else if (t->orphan) {
      cl_fw_txn_free(t);
    }
  }
}
