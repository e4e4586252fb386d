/*
 * The ring core of clawlua.audit: the bounded ring of serialised events, emission (the C API
 * every primitive calls, and what the Lua binding in audit.c calls), filters, the pid table.
 * It calls nothing else in runtime/audit/: sinks are reached through their asink function
 * pointers, and the kernel source, the sinks and the Lua binding are layered above it (see
 * audit_int.h).
 *
 * Events live in a ring of `capacity` slots. Each event is serialised once, at emission, into
 * a compact JSON record of at most `event_cap` bytes (long fields are cut with a marker and, if
 * the record is still too large, its detail is replaced by a note of its size), so the memory
 * the ring can hold is bounded by capacity x event_cap whatever is emitted. Appending is O(1);
 * when the ring is full the oldest event is evicted and counted. Sinks get each record as it is
 * stored, in the emitting call; what sinks do in response (rotate, report an error) runs after
 * the event is complete, as events of their own.
 *
 * Record (keys sorted, one line): {"detail":{...},"kind":"vm.start","mono":12.5,"pid":42,
 * "sandbox":"vm-1","seq":17,"time":1764390000.25} -- "pid"/"sandbox" only when known,
 * "truncated":true when the record had to be cut.
 */
#include "audit_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_CAPACITY  10000
#define DEFAULT_EVENT_CAP 4096
#define SANDBOX_MAX       AUDIT_SANDBOX_MAX
#define PID_BUCKETS       AUDIT_PID_BUCKETS
/* Forgotten pids stay attributable this long: the kernel's audit records reach us through
 * kauditd, often after the loop has reaped the process that caused them. */
#define PID_GONE_TTL_NS (10ull * 1000000000ull)
#define PID_GONE_MAX    1024
#define ANCESTOR_DEPTH  32
#define ENC_KEEP        (64u << 10) /* larger record scratch buffers are freed after the emit */
#define WALL_RESYNC_NS  1000000u    /* CLOCK_REALTIME is read again after 1 ms */

static const char AUDIT_KEY = 'A';

audit *audit_get(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &AUDIT_KEY);
  audit *a = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return a;
}

void audit_push(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &AUDIT_KEY);
}

void audit_set(lua_State *L) {
  lua_rawsetp(L, LUA_REGISTRYINDEX, &AUDIT_KEY);
}

/* ------------------------------------------------------------------------------------------ */
/* pid -> sandbox                                                                             */

static pident **pid_find(audit *a, pid_t pid) {
  pident **p = &a->pids[(unsigned)pid % PID_BUCKETS];
  while (*p && (*p)->pid != pid) p = &(*p)->next;
  return p;
}

/* Drops forgotten entries past their time (all of them when `all`). */
static void pid_sweep(audit *a, int all) {
  uint64_t now = cl_now_ns();
  for (int i = 0; i < PID_BUCKETS; i++) {
    pident **p = &a->pids[i];
    while (*p) {
      pident *e = *p;
      if (e->gone && (all || now - e->gone > PID_GONE_TTL_NS)) {
        *p = e->next;
        free(e);
        a->npids--;
        a->ngone--;
      } else {
        p = &e->next;
      }
    }
  }
}

int audit_track_pid(audit *a, pid_t pid, const char *sandbox) {
  if (pid <= 0 || !sandbox) return 0;
  pident **p = pid_find(a, pid);
  if (!*p) {
    *p = calloc(1, sizeof **p);
    if (!*p) return 0;
    (*p)->pid = pid;
    a->npids++;
  } else if ((*p)->gone) { /* the pid was reused */
    (*p)->gone = 0;
    a->ngone--;
  }
  snprintf((*p)->sandbox, sizeof(*p)->sandbox, "%s", sandbox);
  return 1;
}

void cl_audit_forget_pid(lua_State *L, pid_t pid) {
  audit *a = audit_get(L);
  if (!a) return;
  pident *e = *pid_find(a, pid);
  if (e && !e->gone) {
    e->gone = cl_now_ns();
    a->ngone++;
    if (a->ngone > PID_GONE_MAX) pid_sweep(a, 0);
    if (a->ngone > PID_GONE_MAX) pid_sweep(a, 1);
  }
}

const char *cl_audit_sandbox_of(lua_State *L, pid_t pid) {
  audit *a = audit_get(L);
  if (!a) return NULL;
  pident *e = *pid_find(a, pid);
  return e && !e->gone ? e->sandbox : NULL;
}

/* The parent of pid from /proc (works for zombies too), or 0. */
static pid_t parent_of(pid_t pid) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "re");
  if (!f) return 0;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  const char *rp = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
  if (!rp || rp[1] != ' ' || !rp[2] || rp[3] != ' ') return 0; /* ") S 123 ..." */
  char *end;
  long ppid = strtol(rp + 4, &end, 10);
  if (end == rp + 4 || ppid < 0 || ppid > INT32_MAX) return 0;
  return (pid_t)ppid;
}

const char *audit_attribute(audit *a, pid_t pid, int walk_ancestors) {
  if (pid <= 0) return NULL;
  pident *e = *pid_find(a, pid);
  if (e && (!e->gone || cl_now_ns() - e->gone <= PID_GONE_TTL_NS)) return e->sandbox;
  if (!walk_ancestors || a->npids == 0) return NULL;
  pid_t p = pid;
  for (int depth = 0; depth < ANCESTOR_DEPTH; depth++) {
    p = parent_of(p);
    if (p <= 1) return NULL;
    e = *pid_find(a, p);
    if (e && !e->gone) return e->sandbox;
  }
  return NULL;
}

void audit_bump_seq(audit *a, uint64_t seq) {
  if (seq > a->seq) a->seq = seq;
}

/* ------------------------------------------------------------------------------------------ */
/* Records                                                                                    */

/* Length of the valid UTF-8 sequence at p (0: invalid). */
static size_t utf8_seq(const unsigned char *p) {
  unsigned c = p[0];
  size_t n = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;
  if (!n || c > 0xf4) return 0;
  for (size_t i = 1; i < n; i++)
    if ((p[i] & 0xc0) != 0x80) return 0; /* also stops at the terminating NUL */
  if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] > 0x9f) || (c == 0xf0 && p[1] < 0x90) ||
      (c == 0xf4 && p[1] > 0x8f))
    return 0; /* overlong, surrogate, beyond U+10FFFF */
  return n;
}

/* Appends s as a JSON string (s is short and from C: ids and kinds). Valid UTF-8 passes
 * through; control characters are escaped and invalid bytes become U+FFFD. */
static size_t put_json_string(char *o, size_t room, const char *s) {
  static const char hex[] = "0123456789abcdef";
  size_t n = 0;
  if (room < 3) return 0;
  o[n++] = '"';
  for (const unsigned char *p = (const unsigned char *)s; *p && n + 8 < room;) {
    unsigned c = *p;
    if (c == '"' || c == '\\') {
      o[n++] = '\\';
      o[n++] = (char)c;
      p++;
    } else if (c < 0x20 || c == 0x7f) {
      o[n] = '\\';
      o[n + 1] = 'u';
      o[n + 2] = '0';
      o[n + 3] = '0';
      o[n + 4] = hex[c >> 4];
      o[n + 5] = hex[c & 15];
      n += 6;
      p++;
    } else if (c < 0x80) {
      o[n++] = (char)c;
      p++;
    } else {
      size_t k = utf8_seq(p);
      if (k) {
        memcpy(o + n, p, k);
        n += k;
        p += k;
      } else {
        static const char repl[6] = {'\\', 'u', 'f', 'f', 'f', 'd'};
        memcpy(o + n, repl, sizeof repl);
        n += 6;
        p++;
      }
    }
  }
  o[n++] = '"';
  return n;
}

static const char digit_pairs[201] = "00010203040506070809101112131415161718192021222324"
                                     "25262728293031323334353637383940414243444546474849"
                                     "50515253545556575859606162636465666768697071727374"
                                     "75767778798081828384858687888990919293949596979899";

/* Two digits per division: numbers are a fifth of a record's tail. */
static size_t put_u64(char *o, uint64_t v) {
  char tmp[24], *q = tmp + sizeof tmp;
  while (v >= 100) {
    q -= 2;
    memcpy(q, digit_pairs + (v % 100) * 2, 2);
    v /= 100;
  }
  if (v >= 10) {
    q -= 2;
    memcpy(q, digit_pairs + v * 2, 2);
  } else {
    *--q = (char)('0' + v);
  }
  size_t n = (size_t)(tmp + sizeof tmp - q);
  memcpy(o, q, n);
  return n;
}

/* ns as seconds with 6 decimals ("12.000345"): what %.6f printed, without formatting a double
 * (which cost a quarter of an emit). The whole seconds change once a second: their digits are
 * kept in c. */
static size_t put_seconds(char *o, uint64_t ns, audit_secs *c) {
  uint64_t sec = ns / 1000000000u;
  if (sec != c->sec || !c->len) {
    c->sec = sec;
    c->len = (uint8_t)put_u64(c->digits, sec);
  }
  memcpy(o, c->digits, sizeof c->digits);
  size_t n = c->len;
  uint32_t us = (uint32_t)(ns % 1000000000u / 1000u);
  o[n++] = '.';
  for (int i = 4; i >= 0; i -= 2, us /= 100) memcpy(o + n + i, digit_pairs + (us % 100) * 2, 2);
  return n + 6;
}

/* A string literal (its length known when compiled). */
#define PUT_LIT(o, lit) (memcpy((o), (lit), sizeof(lit) - 1), sizeof(lit) - 1)

/* The fields after "detail", up to but without the closing brace (and "truncated"). */
static size_t build_tail(audit *a, const slot *s, char *tail, size_t room) {
  size_t tn = 0;
  tn += PUT_LIT(tail + tn, ",\"kind\":");
  if (strcmp(a->kind_cache, s->kind) != 0) { /* a run of events of one kind is common */
    a->kind_json_len = put_json_string(a->kind_json, sizeof a->kind_json, s->kind);
    memcpy(a->kind_cache, s->kind, sizeof a->kind_cache);
  }
  memcpy(tail + tn, a->kind_json, a->kind_json_len);
  tn += a->kind_json_len;
  tn += PUT_LIT(tail + tn, ",\"mono\":");
  tn += put_seconds(tail + tn, s->mono_ns, &a->mono_secs);
  if (s->pid > 0) {
    tn += PUT_LIT(tail + tn, ",\"pid\":");
    tn += put_u64(tail + tn, (uint64_t)s->pid);
  }
  if (s->sandbox[0]) {
    tn += PUT_LIT(tail + tn, ",\"sandbox\":");
    tn += put_json_string(tail + tn, room - tn - 100, s->sandbox);
  }
  tn += PUT_LIT(tail + tn, ",\"seq\":");
  tn += put_u64(tail + tn, s->seq);
  tn += PUT_LIT(tail + tn, ",\"time\":");
  tn += put_seconds(tail + tn, s->wall_ns > 0 ? (uint64_t)s->wall_ns : 0, &a->wall_secs);
  return tn;
}

#define TAIL_MAX 1536 /* kind and sandbox at 8 bytes per character escaped, and numbers */

static void buf_put(cl_buf *b, const char *s, size_t n) { /* room was reserved */
  memcpy(b->p + b->n, s, n);
  b->n += n;
}

/* Copies the record built in b into slot s (at most event_cap bytes). */
static int store_built(audit *a, slot *s, const cl_buf *b) {
  if (!b->p || !b->n || b->n > a->event_cap) return 0;
  if (b->n > s->cap || !s->rec) {
    /* Rounded up, so that a record a few bytes longer than the slot's last one (a sequence
     * number gaining a digit) does not reallocate: the ring's allocations stay flat. */
    size_t cap = (b->n + 63) & ~(size_t)63;
    if (cap > a->event_cap) cap = a->event_cap;
    char *r = realloc(s->rec, cap);
    if (!r) return 0;
    a->bytes += cap - s->cap;
    s->rec = r;
    s->cap = (uint32_t)cap;
  }
  memcpy(s->rec, b->p, b->n);
  s->len = (uint32_t)b->n;
  return 1;
}

/* Builds the record for slot s from the detail JSON d (len dl) and the tail into s->rec. */
static int store_record(audit *a, slot *s, const char *d, size_t dl, const char *tail, size_t tn,
                        int cut) {
  static const char head[] = "{\"detail\":";
  static const char trunc[] = ",\"truncated\":true}";
  cl_buf *b = &a->enc;
  b->n = 0;
  if (!cl_buf_reserve(b, sizeof head + dl + tn + sizeof trunc)) return 0;
  buf_put(b, head, sizeof head - 1);
  buf_put(b, d, dl);
  buf_put(b, tail, tn);
  if (cut)
    buf_put(b, trunc, sizeof trunc - 1);
  else
    buf_put(b, "}", 1);
  return store_built(a, s, b);
}

/* Builds the record with the detail table at stack index detail, whose strings are cut at
 * max_string bytes (0: not cut), straight into the scratch buffer. Returns 0 when it does not
 * fit event_cap (or memory ran out); *cut is set when something had to be replaced or cut. */
static int store_detail(lua_State *L, audit *a, slot *s, int detail, const char *const *skip,
                        size_t max_string, const char *tail, size_t tn, int *cut) {
  static const char head[] = "{\"detail\":";
  static const char trunc[] = ",\"truncated\":true}";
  cl_buf *b = &a->enc;
  b->n = 0;
  size_t fixed = sizeof head + tn + sizeof trunc;
  if (fixed >= a->event_cap || !cl_buf_reserve(b, fixed + 256)) return 0;
  buf_put(b, head, sizeof head - 1);
  cl_json_lenient o = {.max_string = max_string,
                       .max_depth = 16,
                       .max_size = a->event_cap - fixed,
                       .sort_keys = 1,
                       .skip = skip,
                       .keys = &a->keys};
  long replaced = 0;
  int r = cl_json_encode_lenient(L, detail, b, &o, &replaced);
  if (r == 0) lua_pop(L, 1); /* the message */
  if (r < 0) {
    *cut = 1;
    return 0; /* too large: the caller cuts harder */
  }
  if (r == 0 || replaced) *cut = 1;
  if (r == 0) buf_put(b, "{}", 2); /* unencodable: an empty detail (room was reserved) */
  if (!cl_buf_reserve(b, tn + sizeof trunc)) return 0;
  buf_put(b, tail, tn);
  if (*cut)
    buf_put(b, trunc, sizeof trunc - 1);
  else
    buf_put(b, "}", 1);
  return store_built(a, s, b);
}

/* strlcpy: the kind and the sandbox id into their slot fields (snprintf cost an eighth of an
 * emit). */
static void copy_id(char *dst, size_t size, const char *src) {
  size_t n = strnlen(src, size - 1);
  memcpy(dst, src, n);
  dst[n] = 0;
}

/* The wall clock at monotonic time mono. CLOCK_REALTIME is read at most every WALL_RESYNC_NS
 * and kept as an offset from the monotonic clock: the two clock reads per event cost a tenth of
 * an emit. A step of the system clock shows in events within WALL_RESYNC_NS; between reads the
 * wall clock advances exactly as the monotonic one (NTP slews it by at most 0.5 us in that
 * time). */
static int64_t wall_now(audit *a, uint64_t mono) {
  if (!a->wall_read || mono - a->wall_read >= WALL_RESYNC_NS) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    a->wall_off = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - (int64_t)mono;
    a->wall_read = mono ? mono : 1;
  }
  return (int64_t)mono + a->wall_off;
}

/* Sinks' post-emit work (rotation, reports of errors and drops) emits events of its own, so it
 * runs after the event that caused it is complete, never nested inside it. */
static void run_pending(lua_State *L, audit *a) {
  if (a->in_pending) return; /* the outer call's loop picks up what this emit queued */
  a->in_pending = 1;
  for (int round = 0; round < 64; round++) {
    int any = 0;
    for (asink *s = a->sinks; s; s = s->next) {
      if (!s->has_pending || !s->active) continue;
      s->has_pending = 0;
      any = 1;
      s->pending(L, a, s);
    }
    if (!any) break;
  }
  a->in_pending = 0;
}

uint64_t audit_emit(lua_State *L, audit *a, const char *kind, const char *sandbox, pid_t pid,
                    int detail, const char *const *skip) {
  if (a->emitting) return 0; /* a __tojson that emits: dropped rather than recursing */
  a->emitting = 1;
  slot *s;
  if (a->count == a->capacity) { /* evict the oldest */
    s = &a->ring[a->head];
    a->head = (a->head + 1) % a->capacity;
    a->count--;
    a->evicted++;
  } else {
    s = &a->ring[(a->head + a->count) % a->capacity];
  }
  size_t idx = (size_t)(s - a->ring);
  if (idx >= a->used) a->used = idx + 1;
  s->seq = ++a->seq;
  s->mono_ns = cl_now_ns();
  s->wall_ns = wall_now(a, s->mono_ns);
  s->wall = (double)s->wall_ns / 1e9;
  s->pid = pid > 0 ? pid : 0;
  copy_id(s->kind, sizeof s->kind, kind);
  if (!sandbox && pid > 0) sandbox = audit_attribute(a, pid, 0);
  copy_id(s->sandbox, sizeof s->sandbox, sandbox ? sandbox : "");
  char tail[TAIL_MAX];
  size_t tn = build_tail(a, s, tail, sizeof tail);

  /* The detail, cut harder until the record fits. */
  int top = lua_gettop(L);
  static const size_t cuts[] = {0, 1024, 256, 64};
  int stored = 0, cut = 0;
  if (!detail) stored = store_record(a, s, "{}", 2, tail, tn, 0);
  for (size_t i = 0; i < CL_ARRAY_LEN(cuts) && !stored; i++) {
    stored = store_detail(L, a, s, detail, skip, cuts[i] ? cuts[i] : a->event_cap, tail, tn, &cut);
    lua_settop(L, top);
    if (!stored) cut = 1;
  }
  if (!stored) {
    char note[80];
    int n = snprintf(note, sizeof note, "{\"_dropped_detail\":true}");
    if (!store_record(a, s, note, (size_t)n, tail, tn, 1)) s->len = 0; /* out of memory */
  }
  if (cut) a->truncated++;
  a->count++;
  for (asink *k = a->sinks; k && s->len; k = k->next)
    if (k->active && (k->force_seq == s->seq || audit_slot_matches(&k->filter, s)))
      k->write(a, k, s);
  if (a->enc.cap > ENC_KEEP) { /* a large record: give its scratch space back */
    cl_buf_free(&a->enc);
  }
  /* The next two slots are written by the next two emits: fetch them now (a ring larger than
   * the cache makes each slot a cache miss). The one after next only its slot; the next one,
   * fetched by the emit before, also its record buffer. */
  slot *next = &a->ring[(idx + 1) % a->capacity], *after = &a->ring[(idx + 2) % a->capacity];
  __builtin_prefetch(after, 1);
  __builtin_prefetch((char *)after + 64, 1);
  for (uint32_t off = 0; next->rec && off < next->len && off < 512; off += 64)
    __builtin_prefetch(next->rec + off, 1);
  a->emitting = 0;
  uint64_t seq = s->seq;
  cl_waitq_wake_all(&a->waiters, 0);
  run_pending(L, a);
  return seq;
}

void cl_audit_emit(lua_State *L, const char *kind, const char *sandbox, pid_t pid, int detail) {
  audit *a = audit_get(L);
  if (!a) return;
  if (detail) detail = lua_absindex(L, detail);
  audit_emit(L, a, kind, sandbox, pid, detail, NULL);
}

void audit_add_sink(audit *a, asink *s) {
  asink **p = &a->sinks;
  while (*p) p = &(*p)->next;
  s->next = NULL;
  *p = s;
}

void audit_remove_sink(audit *a, asink *s) {
  for (asink **p = &a->sinks; *p; p = &(*p)->next) {
    if (*p == s) {
      *p = s->next;
      s->next = NULL;
      return;
    }
  }
}

static const char *const filter_fields[] = {"kind",  "sandbox",   "vm",    "pid", "since",
                                            "until", "after_seq", "limit", NULL};

void audit_read_filter(lua_State *L, int idx, afilter *f, const char *const *fields) {
  memset(f, 0, sizeof *f);
  f->since = -1;
  f->until = -1;
  if (lua_isnoneornil(L, idx)) return;
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  cl_check_fields(L, idx, fields ? fields : filter_fields);
  f->kind = cl_opt_string(L, idx, "kind", NULL);
  if (f->kind) f->kind_len = strlen(f->kind);
  f->sandbox = cl_opt_string(L, idx, "sandbox", cl_opt_string(L, idx, "vm", NULL));
  f->pid = cl_opt_integer(L, idx, "pid", 0);
  f->since = cl_opt_number(L, idx, "since", -1);
  f->until = cl_opt_number(L, idx, "until", -1);
  lua_Integer after = cl_opt_integer(L, idx, "after_seq", 0);
  if (after < 0) cl_field_error(L, "after_seq", "must not be negative");
  f->after_seq = (uint64_t)after;
  f->limit = cl_opt_integer(L, idx, "limit", 0);
  if (f->limit < 0) cl_field_error(L, "limit", "must not be negative");
}

/* kind "vm" matches "vm" and "vm.start", not "vmx". */
int audit_kind_matches(const afilter *f, const char *kind, size_t kind_len) {
  if (!f->kind) return 1;
  return kind_len >= f->kind_len && memcmp(kind, f->kind, f->kind_len) == 0 &&
         (kind_len == f->kind_len || kind[f->kind_len] == '.');
}

int audit_slot_matches(const afilter *f, const slot *s) {
  if (s->seq <= f->after_seq) return 0;
  if (!audit_kind_matches(f, s->kind, strlen(s->kind))) return 0;
  if (f->sandbox && strcmp(f->sandbox, s->sandbox) != 0) return 0;
  if (f->pid && f->pid != s->pid) return 0;
  if (f->since >= 0 && s->wall < f->since) return 0;
  if (f->until >= 0 && s->wall > f->until) return 0;
  return 1;
}

static void free_ring(audit *a) {
  /* Only slots below `used` ever held a record: the rest of a large, freshly calloc'ed ring is
   * never touched (a short-lived process pays no page faults for it). */
  for (size_t i = 0; i < a->used; i++) free(a->ring[i].rec);
  a->used = 0;
  free(a->ring);
  a->ring = NULL;
  a->bytes = 0;
}

/* Re-creates the ring with a new capacity, keeping the newest events that fit. */
int audit_resize(audit *a, size_t capacity) {
  slot *ring = calloc(capacity, sizeof *ring);
  if (!ring) return ENOMEM;
  size_t keep = a->count < capacity ? a->count : capacity;
  size_t skip = a->count - keep, bytes = 0;
  for (size_t i = 0; i < a->count; i++) {
    slot *s = &a->ring[(a->head + i) % a->capacity];
    if (i < skip) {
      free(s->rec);
      a->evicted++;
    } else {
      ring[i - skip] = *s;
      bytes += s->cap;
    }
    s->rec = NULL;
  }
  free_ring(a);
  a->ring = ring;
  a->capacity = capacity;
  a->head = 0;
  a->count = keep;
  a->used = keep;
  a->bytes = bytes;
  return 0;
}

void audit_set_event_cap(audit *a, size_t event_cap) {
  a->event_cap = event_cap;
  /* Records over a lowered cap lose their detail: the memory bound must hold at once. */
  for (size_t i = 0; i < a->count; i++) {
    slot *s = &a->ring[(a->head + i) % a->capacity];
    if (s->cap <= a->event_cap) continue;
    const char *note = "{\"_dropped_detail\":true}";
    free(s->rec);
    a->bytes -= s->cap;
    s->rec = NULL;
    s->cap = 0;
    char tail[TAIL_MAX];
    size_t tn = build_tail(a, s, tail, sizeof tail);
    if (!store_record(a, s, note, strlen(note), tail, tn, 1)) s->len = 0;
  }
}

int audit_init(audit *a, lua_State *L) {
  memset(a, 0, sizeof *a);
  a->event_cap = DEFAULT_EVENT_CAP;
  a->capacity = DEFAULT_CAPACITY;
  a->kind_json_len = put_json_string(a->kind_json, sizeof a->kind_json, a->kind_cache);
  a->ring = calloc(a->capacity, sizeof *a->ring);
  if (!a->ring) return ENOMEM;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  a->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  return 0;
}

void audit_release(audit *a) {
  if (!a->ring) return; /* released already */
  free_ring(a);
  cl_buf_free(&a->enc);
  for (int i = 0; i < PID_BUCKETS; i++) {
    while (a->pids[i]) {
      pident *e = a->pids[i];
      a->pids[i] = e->next;
      free(e);
    }
  }
}
