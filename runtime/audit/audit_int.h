/*
 * Private header of the audit primitive (runtime/audit/). Nothing here is visible outside
 * runtime/audit/; other primitives use the C API in clawlua.h (cl_audit_emit, cl_audit_*_pid).
 *
 * One-way flow (a file calls only files below it; upward calls go through function pointers):
 *
 *   audit.c    Lua binding: the module table, audit.emit/events/query/wait/configure/stats
 *     |
 *   sink.c     audit.sink{} and the stderr sink; sink_file.c the JSONL file sink, sink_sync.c
 *              its fsync worker (sink_int.h); each sink is an asink the ring calls back
 *   kernel.c   the kernel audit source (netlink; kernel-facing), cl_audit_track_pid
 *     |
 *   chain.c    the hash chain of files and its verifier
 *     |
 *   record.c   record scanner, one-line formatter, JSONL file reader
 *     |
 *   ring.c     the core: ring, emission (cl_audit_emit), filters, pid table
 *
 * The core calls sinks only through asink.write/.pending, so it depends on nothing above it.
 */
#ifndef CLAWLUA_AUDIT_INT_H
#define CLAWLUA_AUDIT_INT_H

#include "clawlua.h"

#include <stdint.h>

#define AUDIT_KIND_MAX      63
#define AUDIT_SANDBOX_MAX   127
#define AUDIT_MIN_EVENT_CAP 256
#define AUDIT_MAX_EVENT_CAP (1 << 20)
#define AUDIT_PID_BUCKETS   256
/* A ring record written to a file gains its chain fields: ,"prev":"<64 hex>","hash":"<64 hex>"
 * replaces the closing brace, then a newline. */
#define AUDIT_HEX          64
#define AUDIT_CHAIN_SUFFIX (9 + AUDIT_HEX + 10 + AUDIT_HEX + 2)
/* The longest line a reader accepts: the largest record plus its chain fields. */
#define AUDIT_MAX_LINE (AUDIT_MAX_EVENT_CAP + AUDIT_CHAIN_SUFFIX + 64)

typedef struct audit audit;
/* The digits of a whole number of seconds, kept while it stays the same. */
typedef struct audit_secs {
  uint64_t sec;
  char digits[24];
  uint8_t len; /* 0: none yet */
} audit_secs;
typedef struct asink asink;
typedef struct ksource ksource;

/* The fields an emit writes come first, so that a short kind and sandbox keep it to two cache
 * lines of the slot. */
typedef struct slot {
  uint64_t seq;
  double wall;     /* seconds, for filters */
  int64_t wall_ns; /* the same, exactly, for the record */
  uint64_t mono_ns;
  char *rec; /* the record: compact JSON, keys sorted, no newline */
  uint32_t len, cap;
  pid_t pid;
  char kind[AUDIT_KIND_MAX + 1];
  char sandbox[AUDIT_SANDBOX_MAX + 1];
} slot;

typedef struct pident {
  struct pident *next;
  pid_t pid;
  uint64_t gone; /* monotonic ns when forgotten (kept a while for late kernel records); 0: live */
  char sandbox[AUDIT_SANDBOX_MAX + 1];
} pident;

/* Filters of queries, sinks and file readers. Strings point into Lua strings that the owner
 * keeps alive (the caller's argument, or a user value of a sink or reader). */
typedef struct afilter {
  const char *kind;
  size_t kind_len;
  const char *sandbox;
  lua_Integer pid;
  double since, until; /* < 0: unset */
  uint64_t after_seq;
  lua_Integer limit;
} afilter;

struct audit {
  slot *ring;
  size_t capacity, head, count; /* head: index of the oldest event */
  size_t used;                  /* slots [0, used) may hold a record buffer */
  size_t event_cap;
  uint64_t seq; /* last sequence number handed out */
  uint64_t evicted, truncated;
  size_t bytes;     /* record buffers held by the ring */
  cl_waitq waiters; /* audit.wait(): woken on every event */
  pident *pids[AUDIT_PID_BUCKETS];
  size_t npids, ngone;
  int emitting;          /* re-entrancy guard (an emit from inside an emit) */
  int in_pending;        /* running the sinks' post-emit work */
  asink *sinks;          /* active sinks, in the order they were added */
  uint64_t sink_dropped; /* records sinks could not write, all sinks, closed ones included */
  ksource *kernel;
  int kernel_disabled; /* audit.kernel_source{enable=false}: no automatic start */
  lua_State *L;        /* main thread, for work started outside any Lua call */
  cl_buf enc;          /* where a record is built before it is copied into its slot */
  char kind_cache[AUDIT_KIND_MAX + 1]; /* the kind of the last record, and as JSON: */
  char kind_json[8 * AUDIT_KIND_MAX + 16];
  size_t kind_json_len;
  audit_secs mono_secs, wall_secs;
  /* The wall clock as an offset from the monotonic one, read again every WALL_RESYNC_NS (one
   * clock read per event instead of two). */
  int64_t wall_off;
  uint64_t wall_read;     /* monotonic ns when CLOCK_REALTIME was last read (0: never) */
  const char *valid_kind; /* the last kind audit.emit checked (anchored in its upvalue) */
  cl_json_keys keys;      /* the JSON of detail keys met before */
};

/* Sinks: what every sink has; the type-specific part follows in sink.c. The ring calls write for
 * each record the filter passes, and pending after the event is complete. */
struct asink {
  asink *next;
  int active;
  int has_pending;    /* post-emit work queued (rotation, error and drop reports) */
  uint64_t force_seq; /* an event this sink writes whatever its filter (its own anchor) */
  afilter filter;
  int (*write)(audit *a, asink *s, const slot *e);
  void (*pending)(lua_State *L, audit *a, asink *s);
};

/* ring.c: the core */
audit *audit_get(lua_State *L);
void audit_push(lua_State *L); /* pushes the ring's userdata */
/* Registers the audit userdata on top of the stack (popped) as the state's ring. */
void audit_set(lua_State *L);
/* A zeroed ring with the default capacity and event cap; ENOMEM or 0. */
int audit_init(audit *a, lua_State *L);
/* Frees what audit_init and the events made (sinks and the kernel source are their owners'). */
void audit_release(audit *a);
int audit_resize(audit *a, size_t capacity);    /* keeps the newest events; ENOMEM or 0 */
void audit_set_event_cap(audit *a, size_t cap); /* records over it lose their detail */
/* Attributes pid to sandbox (1), or 0 when it cannot (bad arguments, out of memory). */
int audit_track_pid(audit *a, pid_t pid, const char *sandbox);
/* Emits an event with the detail table at stack index detail (0: none), without its keys in
 * skip (NULL-terminated, or NULL); returns its seq (0 when dropped: emitted from inside an
 * emit). */
uint64_t audit_emit(lua_State *L, audit *a, const char *kind, const char *sandbox, pid_t pid,
                    int detail, const char *const *skip);
/* Reads a filter table at idx; `fields` restricts the accepted keys (NULL: all). */
void audit_read_filter(lua_State *L, int idx, afilter *f, const char *const *fields);
int audit_kind_matches(const afilter *f, const char *kind, size_t kind_len);
int audit_slot_matches(const afilter *f, const slot *s);
void audit_add_sink(audit *a, asink *s);
void audit_remove_sink(audit *a, asink *s);
/* Raises the sequence counter so the next event gets a number above seq (a log file that
 * already holds later events). */
void audit_bump_seq(audit *a, uint64_t seq);
/* The sandbox of pid, of a process that exited recently, or of its nearest tracked ancestor. */
const char *audit_attribute(audit *a, pid_t pid, int walk_ancestors);

/* sink.c */
int audit_sink_open(lua_State *L);      /* audit.sink{...} */
void audit_sink_register(lua_State *L); /* metatables */
void audit_sinks_close_all(audit *a);
int audit_bench_sink(lua_State *L); /* hidden benchmark hooks */
int audit_bench_write(lua_State *L);

/* record.c: a view of one record (a ring record or a file line) found by a single scan.
 * Strings are raw JSON string contents (still escaped). */
typedef struct recview {
  const char *detail; /* raw JSON value */
  size_t detail_len;
  const char *kind, *sandbox;
  size_t kind_len, sandbox_len;
  lua_Integer pid;
  uint64_t seq;
  double time, mono;
  const char *prev, *hash; /* 64 hex digits each, or NULL */
  size_t body_end;         /* length of the line before its chain fields (0: no chain fields) */
  int has_seq, has_time, truncated;
} recview;
int audit_scan(const char *s, size_t n, recview *v);
/* Filter test on a scanned record. */
int audit_view_matches(const afilter *f, const recview *v);
/* Appends a one-line human form of the record to b (at most max bytes). */
size_t audit_format(const recview *v, int color, char *out, size_t max);
int audit_reader_open(lua_State *L); /* audit.reader(path, opts) */
int audit_l_format(lua_State *L);    /* audit.format(line or event) */
void audit_record_register(lua_State *L);

/* chain.c */
/* hex = SHA-256(prev_hex || body || tail) as 64 lowercase hex digits (tail may be empty). */
int audit_chain_hash(const char *prev_hex, const char *body, size_t body_len, const char *tail,
                     size_t tail_len, char *hex);
int audit_verifier_open(lua_State *L); /* audit._verifier(path, opts) */
int audit_l_head(lua_State *L);        /* audit._file_head(path) */
void audit_chain_register(lua_State *L);
extern const char audit_genesis[AUDIT_HEX + 1];

/* kernel.c */
int audit_kernel_start(lua_State *L, audit *a, int scope_all, int quiet);
void audit_kernel_stop(audit *a);
void audit_kernel_push_state(lua_State *L, audit *a);
int audit_l_kernel_source(lua_State *L);
int audit_l_parse_kernel(lua_State *L); /* hidden: parse one record's text into an event */

#endif
