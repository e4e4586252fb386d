/*
 * Private header of the audit sinks (sink.c: audit.sink{} and the stderr sink; sink_file.c:
 * the JSONL file sink; sink_sync.c: its fsync worker). Flow: sink.c -> sink_file.c ->
 * sink_sync.c, all above the ring core (audit_int.h).
 */
#ifndef CLAWLUA_AUDIT_SINK_H
#define CLAWLUA_AUDIT_SINK_H

#include "audit_int.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>

#define SINK_MT           "clawlua.audit_sink"
#define DEFAULT_MAX_BYTES ((lua_Integer)64 << 20)
#define MIN_MAX_BYTES     4096
#define DEFAULT_KEEP      5
#define MAX_KEEP          1000
#define STDERR_BUF        (64 * 1024)
#define STDERR_LINE       1024
#define MAX_CLOSE         16
#define RETRY_NS          1000000000ull /* reopen / rotation retries: at most once a second */
#define ERROR_REPORT_NS   (10ull * 1000000000ull)
#define BATCH_MAX         (64 * 1024) /* a batch is written once it holds this many bytes */
#ifndef ALWAYS_GAP_NS
#define ALWAYS_GAP_NS 2000000ull /* 2 ms: see sync_main */
#endif

enum { T_FILE, T_STDERR };
enum { FS_NEVER, FS_INTERVAL, FS_ALWAYS };

/* The fsync worker. The loop only stores `written` and, when the worker sleeps waiting for
 * work, signals it; everything else is under mu. */
typedef struct syncer {
  pthread_t th;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int started;
  int policy;
  uint64_t interval_ns;
  uint64_t gap_ns;          /* always: the least time between the starts of two syncs */
  _Atomic uint64_t written; /* records the loop has written (a count: seqs may repeat) */
  _Atomic int idle;         /* the worker waits on cv */
  uint64_t synced;          /* of which known durable */
  uint64_t requested;       /* sink:sync() wants at least this */
  int fd;                   /* the worker's own dup of the current file */
  int closing[MAX_CLOSE];   /* files rotated away: sync (per policy) and close */
  int nclosing;
  int stop;
  int evfd; /* worker -> loop: synced moved */
  uint64_t fsyncs, sync_errors;
  int last_err;
  uint64_t max_sync_ns, total_sync_ns;
} syncer;

typedef struct sink {
  asink base;
  int type;
  int closed;
  int policy;
  audit *a;
  /* file */
  char *path;
  int fd;
  off_t size;
  lua_Integer max_bytes;
  int keep, mode;
  char head[AUDIT_HEX]; /* hash of the last record in the file */
  uint64_t file_records, last_seq;
  char *line;
  size_t linecap;
  char *pend; /* the anchor of a new file, not written yet: it must come first */
  size_t pendlen, pendcap;
  char pend_hash[AUDIT_HEX];
  uint64_t pend_seq;
  uint64_t anchor_seq; /* the anchor being emitted */
  int need_rotate, want_reopen, need_newline;
  uint64_t next_retry;
  const char *anchor_reason;
  uint64_t anchor_prev_seq;
  lua_Integer cut_bytes;
  /* failures */
  int failing, fail_err, report_error, report_recovered;
  const char *fail_op;
  int last_err;               /* the last error seen, for stats */
  uint64_t last_error_report; /* when an audit.sink.error was last emitted (mono ns) */
  uint64_t dropped, dropped_since, drop_first, drop_last;
  uint64_t written, bytes, rotations, write_errors;
  /* batch = true: framed records waiting for one write(2) (at BATCH_MAX bytes, or when the
   * loop next runs its timers) */
  int batch;
  char *bb;
  size_t bblen, bbcap;
  struct bentry {
    size_t end; /* where the record ends in bb */
    uint64_t seq;
    char hash[AUDIT_HEX];
  } * be;
  size_t nbe, cbe;
  cl_loop *loop;
  cl_timer flush_t;
  syncer *sy;
  cl_watch evwatch;
  cl_waitq sync_waiters;
  /* stderr */
  int efd;
  int color;
  int watching;
  cl_watch owatch;
  char *obuf;
  size_t olen;
  uint64_t lost_lines;
} sink;

/* sink_sync.c: the fsync worker of a file sink */
int audit_syncer_start(sink *s, int policy, double interval); /* 0 or an errno */
int audit_syncer_set_fd(sink *s); /* hands the worker a dup of the current file */
void audit_syncer_stop(sink *s);
void audit_syncer_wrote(syncer *y, uint64_t count);
void audit_on_synced(cl_watch *w, uint32_t events); /* the loop side of the worker's eventfd */

/* sink_file.c: the JSONL file sink */
int audit_file_write(audit *a, asink *base, const slot *e);
void audit_file_pending(lua_State *L, audit *a, asink *base);
int audit_file_open(sink *s, int find_prev, const char **msg); /* 0 or an errno with *msg */
void audit_file_anchor(lua_State *L, audit *a, sink *s);       /* the anchor a file begins with */
void audit_file_rotate(lua_State *L, audit *a, sink *s, const char *reason);
void audit_sink_count_drop(audit *a, sink *s, uint64_t seq, int err, const char *op);
void audit_file_flush(sink *s); /* writes a batch now (batch = true) */
/* The same, then reports a failure it met (audit.sink.error) unless inside an emit. */
void audit_file_flush_report(lua_State *L, sink *s);

#endif
