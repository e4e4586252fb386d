/*
 * The Firecracker driver: `firecracker --api-sock <run dir>/api.sock --id <id>
 * [--seccomp-filter <file> | --no-seccomp]`, configured over its REST API with libcurl on the
 * loop's shared multi handle (cl_http_add), one call at a time: GET /version first (features
 * are chosen by version), then /logger, /metrics, /machine-config, /boot-source, /drives/rootfs,
 * /network-interfaces/eth0, /vsock and /actions InstanceStart. An answer that is not 2xx fails
 * the operation with Firecracker's fault_message.
 *
 * The agent channel is vsock: Firecracker listens on <run dir>/v.sock for host-initiated
 * connections, the host sends "CONNECT 1024\n" and gets "OK <port>\n" once the guest agent
 * listens. The vsock path is relative to the VMM's working directory (its run directory), so a
 * snapshot restored elsewhere binds its own socket without needing vsock_override.
 *
 * Snapshots: PATCH /vm Paused, PUT /snapshot/create (Full), PATCH /vm Resumed. A restore is a
 * fresh Firecracker: /logger, /metrics, then PUT /snapshot/load with resume_vm.
 */
#include "vm.h"

#include "input.h"

#include "../guest/proto.h"

#include "curl_lazy.h"
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* API calls                                                                                  */

void cl_fc_release_api(vm *v) {
  vm_api *a = &v->api;
  if (a->easy) {
    cl_http_remove(v->L, a->easy);
    curl_easy_cleanup(a->easy);
    a->easy = NULL;
  }
  curl_slist_free_all(a->hdrs);
  a->hdrs = NULL;
  free(a->body);
  a->body = NULL;
  a->body_len = 0;
  free(a->req_body);
  a->req_body = NULL;
  a->busy = a->done = 0;
}

static void calls_clear(vm *v);

void cl_fc_release(vm *v) {
  cl_fc_release_api(v);
  calls_clear(v);
  if (v->vwatch.active) cl_watch_stop(&v->vwatch);
  if (v->vsock_fd >= 0) close(v->vsock_fd);
  v->vsock_fd = -1;
}

size_t cl_fc_on_body(char *data, size_t size, size_t nmemb, void *ud) {
  vm_api *a = ud;
  size_t n = size * nmemb;
  if (a->body_len + n > API_BODY_MAX) return 0;
  char *p = realloc(a->body, a->body_len + n + 1);
  if (!p) return 0;
  a->body = p;
  memcpy(a->body + a->body_len, data, n);
  a->body_len += n;
  a->body[a->body_len] = 0;
  return n;
}

static void on_done(void *arg, int code) {
  vm *v = arg;
  vm_api *a = &v->api;
  a->done = 1;
  a->result = code;
  curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &a->status);
  cl_vm_changed(v);
}

/* Starts one call; the answer arrives through on_done. body is JSON text or NULL. */
static int api_call(vm *v, const char *method, const char *path, const char *body) {
  vm_api *a = &v->api;
  cl_fc_release_api(v);
  char why[256]; /* the caller reports the errno (libcurl missing: ENOENT) */
  int le = cl_curl_load(why, sizeof why);
  if (le) return le;
  CURL *e = curl_easy_init();
  if (!e) return ENOMEM;
  a->easy = e;
  snprintf(a->method, sizeof a->method, "%s", method);
  snprintf(a->path, sizeof a->path, "%s", path);
  char url[128], sock[300];
  snprintf(url, sizeof url, "http://localhost%s", path);
  snprintf(sock, sizeof sock, "%s/api.sock", v->rundir);
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, sock);
  curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, cl_fc_on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, a);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 60000L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http");
  /* No connection outlives its call: a cached one would hold an fd to a VMM that may be gone. */
  curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
  struct curl_slist *h = curl_slist_append(NULL, "Accept: application/json");
  if (body) {
    h = curl_slist_append(h, "Content-Type: application/json");
    a->req_body = strdup(body);
    if (!a->req_body) return ENOMEM;
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, a->req_body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(a->req_body));
  }
  h = curl_slist_append(h, "Expect:"); /* no 100-continue round trip */
  a->hdrs = h;
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
  a->busy = 1;
  a->done = 0;
  int err = cl_http_add(v->L, e, on_done, v);
  if (err) a->busy = 0;
  return err;
}

void cl_fc_fault(const char *body, char *out, size_t n) {
  out[0] = 0;
  cJSON *j = body ? cJSON_Parse(body) : NULL;
  cJSON *fm = j ? cJSON_GetObjectItemCaseSensitive(j, "fault_message") : NULL;
  if (fm && cJSON_IsString(fm))
    snprintf(out, n, "%s", fm->valuestring);
  else if (body)
    snprintf(out, n, "%.300s", body);
  cJSON_Delete(j);
}

/* VM_WAIT, 1 (a 2xx answer, body in v->api.body) or a pushed failure. */
static int api_await(lua_State *L, vm *v, cl_wait *w, int fatal) {
  vm_api *a = &v->api;
  if (!a->done) {
    if (v->exited)
      return cl_vm_fail(L, v, 1, 1, ECHILD, "%s %s: the VMM exited", a->method, a->path);
    if (w->state == CL_WAIT_TIMEOUT)
      return cl_vm_fail(L, v, fatal, fatal, ETIMEDOUT, "%s %s: no answer from Firecracker",
                        a->method, a->path);
    return VM_WAIT;
  }
  a->busy = 0;
  if (a->result != CURLE_OK)
    return cl_vm_fail(L, v, fatal, 1, EIO, "%s %s: %s", a->method, a->path,
                      curl_easy_strerror((CURLcode)a->result));
  if (a->status / 100 != 2) {
    char fault[400];
    cl_fc_fault(a->body, fault, sizeof fault);
    return cl_vm_fail(L, v, fatal, 0, EIO, "firecracker %s %s: %ld: %s", a->method, a->path,
                      a->status, fault[0] ? fault : "(no fault_message)");
  }
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* The vsock hand-shake                                                                       */

static void on_vsock(cl_watch *w, uint32_t events) {
  vm *v = w->data;
  ssize_t n =
      read(v->vsock_fd, v->vsock_buf + v->vsock_len, sizeof v->vsock_buf - 1 - v->vsock_len);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0)
    v->vsock_len = sizeof v->vsock_buf; /* marks failure */
  else
    v->vsock_len += (size_t)n;
  cl_vm_changed(v);
}

/* Tries to connect to the guest agent: 1 connected (fd given to the channel), 0 not yet. */
static int vsock_try(vm *v) {
  if (v->vsock_fd < 0) {
    char p[300];
    snprintf(p, sizeof p, "%s/v.sock", v->rundir);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t pl = strlen(p);
    if (pl >= sizeof sa.sun_path) return 0; /* make_rundir keeps run directories short enough */
    memcpy(sa.sun_path, p, pl + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    /* A connect to a listening Unix socket completes at once: no need to wait for it. */
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
      close(fd);
      return 0;
    }
    char line[32];
    int len = snprintf(line, sizeof line, "CONNECT %u\n", CLA_VSOCK_PORT);
    if (write(fd, line, (size_t)len) != len) {
      close(fd);
      return 0;
    }
    cl_set_nonblock(fd, 1);
    v->vsock_fd = fd;
    v->vsock_len = 0;
    if (cl_watch_start(v->loop, &v->vwatch, fd, EPOLLIN, on_vsock) != 0) {
      close(fd);
      v->vsock_fd = -1;
      return 0;
    }
    v->vwatch.data = v;
    return 0;
  }
  if (v->vsock_len >= sizeof v->vsock_buf) goto retry; /* EOF: nobody listens in the guest yet */
  v->vsock_buf[v->vsock_len] = 0;
  char *nl = strchr(v->vsock_buf, '\n');
  if (!nl) return 0;
  if (strncmp(v->vsock_buf, "OK ", 3) != 0) goto retry;
  /* The bytes after the OK line (the agent's READY, already) belong to the channel. */
  size_t extra = v->vsock_len - (size_t)(nl + 1 - v->vsock_buf);
  char keep[32];
  memcpy(keep, nl + 1, extra);
  cl_watch_stop(&v->vwatch);
  int fd = v->vsock_fd;
  v->vsock_fd = -1;
  if (cl_chan_attach(v, fd) != 0) return 0;
  if (extra) {
    memcpy(v->chan.in, keep, extra);
    v->chan.in_len = extra;
  }
  return 1;
retry:
  cl_watch_stop(&v->vwatch);
  close(v->vsock_fd);
  v->vsock_fd = -1;
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Call lists                                                                                 */

static void calls_clear(vm *v) {
  for (int i = 0; i < v->ncalls; i++) free(v->calls[i].body);
  v->ncalls = 0;
}

static void add_call(vm *v, const char *method, const char *path, cJSON *body) {
  if (v->ncalls >= VM_MAX_CALLS) {
    cJSON_Delete(body);
    return;
  }
  vm_call *c = &v->calls[v->ncalls++];
  c->method = method;
  snprintf(c->path, sizeof c->path, "%s", path);
  c->body = body ? cJSON_PrintUnformatted(body) : NULL;
  cJSON_Delete(body);
}

static int version_at_least(vm *v, int major, int minor) {
  return v->fc_major > major || (v->fc_major == major && v->fc_minor >= minor);
}

static void add_logging(vm *v) {
  cJSON *b = cJSON_CreateObject();
  cJSON_AddStringToObject(b, "log_path", v->log_path);
  cJSON_AddStringToObject(b, "level", "Info");
  cJSON_AddBoolToObject(b, "show_level", 1);
  cJSON_AddBoolToObject(b, "show_log_origin", 0);
  add_call(v, "PUT", "/logger", b);
  char mp[300];
  snprintf(mp, sizeof mp, "%s/metrics.json", v->rundir);
  int fd = open(mp, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (fd >= 0) close(fd);
  b = cJSON_CreateObject();
  cJSON_AddStringToObject(b, "metrics_path", mp);
  add_call(v, "PUT", "/metrics", b);
}

static void build_boot_calls(vm *v) {
  calls_clear(v);
  add_logging(v);
  cJSON *b = cJSON_CreateObject();
  cJSON_AddNumberToObject(b, "vcpu_count", v->vcpus);
  cJSON_AddNumberToObject(b, "mem_size_mib", v->mem_mib);
  cJSON_AddBoolToObject(b, "smt", 0);
  add_call(v, "PUT", "/machine-config", b);
  b = cJSON_CreateObject();
  cJSON_AddStringToObject(b, "kernel_image_path", v->kernel);
  if (v->initrd) cJSON_AddStringToObject(b, "initrd_path", v->initrd);
  char args[2600];
  snprintf(args, sizeof args,
           "console=ttyS0 reboot=k panic=1 pci=off quiet clawlua.channel=%s%s%s%s",
           v->channel == CH_VSOCK ? "vsock" : "serial", v->rootfs ? " clawlua.root=/dev/vda" : "",
           v->boot_args ? " " : "", v->boot_args ? v->boot_args : "");
  cJSON_AddStringToObject(b, "boot_args", args);
  add_call(v, "PUT", "/boot-source", b);
  if (v->rootfs) {
    b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "drive_id", "rootfs");
    cJSON_AddStringToObject(b, "path_on_host", v->rootfs);
    cJSON_AddBoolToObject(b, "is_root_device", 0);
    cJSON_AddBoolToObject(b, "is_read_only", v->rootfs_ro);
    add_call(v, "PUT", "/drives/rootfs", b);
  }
  if (v->tap[0]) {
    b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "iface_id", "eth0");
    cJSON_AddStringToObject(b, "host_dev_name", v->tap);
    cJSON_AddStringToObject(b, "guest_mac", v->mac);
    add_call(v, "PUT", "/network-interfaces/eth0", b);
  }
  if (v->channel == CH_VSOCK) {
    b = cJSON_CreateObject();
    cJSON_AddNumberToObject(b, "guest_cid", 3);
    cJSON_AddStringToObject(b, "uds_path", "v.sock");
    add_call(v, "PUT", "/vsock", b);
  }
  b = cJSON_CreateObject();
  cJSON_AddStringToObject(b, "action_type", "InstanceStart");
  add_call(v, "PUT", "/actions", b);
}

static void build_restore_calls(vm *v, const char *snap_tap) {
  calls_clear(v);
  add_logging(v);
  cJSON *b = cJSON_CreateObject();
  char p[600];
  snprintf(p, sizeof p, "%s/vmstate.fc", v->restore_dir);
  cJSON_AddStringToObject(b, "snapshot_path", p);
  cJSON *mb = cJSON_AddObjectToObject(b, "mem_backend");
  cJSON_AddStringToObject(mb, "backend_type", "File");
  snprintf(p, sizeof p, "%s/memory.fc", v->restore_dir);
  cJSON_AddStringToObject(mb, "backend_path", p);
  cJSON_AddBoolToObject(b, "resume_vm", 1);
  /* network_overrides is in the 1.17 API this driver was written against; older versions keep
   * the tap name recorded in the snapshot. */
  if (v->tap[0] && snap_tap && strcmp(snap_tap, v->tap) != 0 && version_at_least(v, 1, 17)) {
    cJSON *arr = cJSON_AddArrayToObject(b, "network_overrides");
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "iface_id", "eth0");
    cJSON_AddStringToObject(o, "host_dev_name", v->tap);
    cJSON_AddItemToArray(arr, o);
  }
  add_call(v, "PUT", "/snapshot/load", b);
}

static int write_meta(vm *v, char *err, size_t errlen) {
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "backend", "firecracker");
  cJSON_AddStringToObject(j, "format", "firecracker snapshot (vmstate.fc, memory.fc)");
  cJSON_AddStringToObject(j, "firecracker_version", v->fc_version);
  if (v->kernel) cJSON_AddStringToObject(j, "kernel", v->kernel);
  if (v->initrd) cJSON_AddStringToObject(j, "initrd", v->initrd);
  if (v->rootfs) cJSON_AddStringToObject(j, "rootfs", v->rootfs);
  if (v->boot_args) cJSON_AddStringToObject(j, "boot_args", v->boot_args);
  cJSON_AddNumberToObject(j, "vcpus", v->vcpus);
  cJSON_AddNumberToObject(j, "mem_mib", v->mem_mib);
  cJSON_AddNumberToObject(j, "rootfs_readonly", v->rootfs_ro);
  cJSON_AddStringToObject(j, "channel", v->channel == CH_VSOCK ? "vsock" : "none");
  if (v->tap[0]) {
    cJSON_AddStringToObject(j, "tap", v->tap);
    cJSON_AddStringToObject(j, "mac", v->mac);
  }
  cJSON_AddStringToObject(j, "source_id", v->id);
  char *s = cJSON_Print(j);
  cJSON_Delete(j);
  char p[600];
  snprintf(p, sizeof p, "%s/vm.json", v->op_path);
  FILE *f = s ? fopen(p, "we") : NULL;
  int e = 0;
  if (!f || fputs(s, f) < 0) e = errno ? errno : EIO;
  if (f && fclose(f) != 0 && !e) e = errno;
  free(s);
  if (e) snprintf(err, errlen, "%.300s: %s", p, strerror(e));
  return e;
}

/* Moves dir_from/name to dir_to/name: a rename, or a copy where they are on two file systems
 * (the run directory is on /run). */
static int move_file(const char *from_dir, const char *to_dir, const char *name, char *err,
                     size_t errlen) {
  char from[600], to[600];
  snprintf(from, sizeof from, "%s/%s", from_dir, name);
  snprintf(to, sizeof to, "%s/%s", to_dir, name);
  if (rename(from, to) == 0) return 0;
  if (errno != EXDEV) {
    snprintf(err, errlen, "%.280s: %s", to, strerror(errno));
    return errno;
  }
  int in = open(from, O_RDONLY | O_CLOEXEC);
  int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int e = in < 0 || out < 0 ? errno : 0;
  while (!e) {
    ssize_t n = copy_file_range(in, NULL, out, NULL, 1 << 30, 0);
    if (n < 0) e = errno;
    if (n <= 0) break;
  }
  if (in >= 0) close(in);
  if (out >= 0 && close(out) != 0 && !e) e = errno;
  if (e) {
    snprintf(err, errlen, "%.280s: %s", to, strerror(e));
    unlink(to);
    return e;
  }
  unlink(from);
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Steps                                                                                      */

/* clawlua filters become the file Firecracker's --seccomp-filter reads (seccomp.firecracker_file:
 * the format of Firecracker 1.0 to 1.14), in the run directory. */
static int write_filter_file(lua_State *L, vm *v, char *path, size_t pathlen, char *err,
                             size_t errlen) {
  int top = lua_gettop(L);
  lua_pushcfunction(L, cl_seccomp_firecracker_file);
  lua_rawgeti(L, LUA_REGISTRYINDEX, v->filter_ref);
  if (!lua_istable(L, -1)) { /* one filter for every thread */
    lua_createtable(L, 0, 3);
    static const char *const threads[] = {"vmm", "api", "vcpu"};
    for (int i = 0; i < 3; i++) {
      lua_pushvalue(L, -2);
      lua_setfield(L, -2, threads[i]);
    }
    lua_remove(L, -2);
  }
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    snprintf(err, errlen, "seccomp: %s", lua_tostring(L, -1));
    lua_settop(L, top);
    return EINVAL;
  }
  size_t len;
  const char *bytes = lua_tolstring(L, -1, &len);
  snprintf(path, pathlen, "%s/seccomp-filter.bpf", v->rundir);
  int e = 0;
  FILE *f = fopen(path, "we");
  if (!f || fwrite(bytes, 1, len, f) != len) e = errno ? errno : EIO;
  if (f && fclose(f) != 0 && !e) e = errno;
  if (e) snprintf(err, errlen, "%s: %s", path, strerror(e));
  lua_settop(L, top);
  return e;
}

static int spawn_fc(lua_State *L, vm *v, char *err, size_t errlen) {
  char sock[300], id[48], filter[300];
  snprintf(sock, sizeof sock, "%s/api.sock", v->rundir);
  snprintf(id, sizeof id, "%s", v->id);
  for (char *p = id; *p; p++)
    if (*p == '_' || *p == '.') *p = '-'; /* Firecracker ids: alphanumerics and '-' */
  char *argv[32];
  int n = 0;
  if (v->vmm)
    for (char **p = v->vmm; *p; p++) argv[n++] = *p;
  else
    argv[n++] = "firecracker";
  argv[n++] = "--api-sock";
  argv[n++] = sock;
  argv[n++] = "--id";
  argv[n++] = id;
  if (v->filter_ref != LUA_NOREF) {
    int e = write_filter_file(L, v, filter, sizeof filter, err, errlen);
    if (e) return e;
    argv[n++] = "--seccomp-filter";
    argv[n++] = filter;
  } else if (v->seccomp_file && v->seccomp_file[0]) {
    argv[n++] = "--seccomp-filter";
    argv[n++] = v->seccomp_file;
  } else if (v->seccomp_file) {
    argv[n++] = "--no-seccomp"; /* the caller said seccomp = false */
  }
  argv[n] = NULL;
  return cl_vm_spawn(L, v, argv, NULL, 0, err, errlen);
}

int cl_fc_parse_version(vm *v) {
  cJSON *j = v->api.body ? cJSON_Parse(v->api.body) : NULL;
  cJSON *x = j ? cJSON_GetObjectItemCaseSensitive(j, "firecracker_version") : NULL;
  int ok = 0;
  if (x && cJSON_IsString(x)) {
    snprintf(v->fc_version, sizeof v->fc_version, "%s", x->valuestring);
    const char *s = x->valuestring;
    if (*s == 'v') s++;
    char *end;
    long major = strtol(s, &end, 10);
    if (end != s && *end == '.') {
      const char *m = end + 1;
      long minor = strtol(m, &end, 10);
      if (end != m) {
        v->fc_major = (int)major;
        v->fc_minor = (int)minor;
        ok = 1;
      }
    }
  }
  cJSON_Delete(j);
  return ok;
}

static char *snap_tap_of(vm *v) {
  char p[600];
  snprintf(p, sizeof p, "%s/vm.json", v->restore_dir);
  FILE *f = fopen(p, "re");
  if (!f) return NULL;
  char buf[8192];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  cJSON *j = cJSON_Parse(buf);
  cJSON *t = j ? cJSON_GetObjectItemCaseSensitive(j, "tap") : NULL;
  char *r = t && cJSON_IsString(t) ? strdup(t->valuestring) : NULL;
  cJSON_Delete(j);
  return r;
}

/* The first step of a start: Firecracker spawned, vm.start recorded. Returns 0, or the
 * failure's results. */
static int spawn_step(lua_State *L, vm *v, cl_wait *w) {
  char err[400];
  v->state = VS_STARTING;
  int e = spawn_fc(L, v, err, sizeof err);
  if (e) return cl_vm_fail(L, v, 1, 1, e, "start: %s", err);
  w->deadline = cl_deadline(v->ready_timeout);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, v->why);
  lua_setfield(L, -2, "why");
  if (v->restore_dir) {
    lua_pushstring(L, v->restore_dir);
    lua_setfield(L, -2, "restore");
  }
  cl_vm_audit(v, L, "vm.start", lua_gettop(L));
  lua_pop(L, 1);
  return 0;
}

static int start_step(lua_State *L, vm *v, cl_wait *w) {
  int r;
  long s = w->aux[0];
  if (s > 0 && v->chan.closed && strstr(v->chan.error, "protocol violation"))
    return cl_vm_fail(L, v, 1, 1, EPROTO, "start: %s", v->chan.error);
  if (s == 0) {
    int n = spawn_step(L, v, w);
    if (n) return n;
    w->aux[0] = s = 1;
  }
  if (s == 1) { /* the API socket appears once Firecracker listens */
    if (v->exited) goto gone;
    char sock[300];
    struct stat st;
    snprintf(sock, sizeof sock, "%s/api.sock", v->rundir);
    if (stat(sock, &st) < 0) {
      if (w->state == CL_WAIT_TIMEOUT) goto timeout;
      cl_vm_poll_in(v, 5);
      return VM_WAIT;
    }
    int e = api_call(v, "GET", "/version", NULL);
    if (e) return cl_vm_fail(L, v, 1, 1, e, "start: GET /version: %s", strerror(e));
    w->aux[0] = 2;
    return VM_WAIT;
  }
  if (s == 2) {
    /* The socket file exists from bind(), a moment before listen(): refused means "not yet". */
    if (v->api.done && v->api.result == CURLE_COULDNT_CONNECT && !v->exited &&
        w->state != CL_WAIT_TIMEOUT) {
      cl_fc_release_api(v);
      w->aux[0] = 1;
      cl_vm_poll_in(v, 5);
      return VM_WAIT;
    }
    r = api_await(L, v, w, 1);
    if (r != 1) return r;
    if (!cl_fc_parse_version(v))
      return cl_vm_fail(L, v, 1, 1, EPROTO, "start: GET /version: no firecracker_version in %.100s",
                        v->api.body ? v->api.body : "(empty)");
    if (v->fc_major < 1)
      return cl_vm_fail(L, v, 1, 0, ENOTSUP, "start: Firecracker %s is older than 1.0",
                        v->fc_version);
    if (v->restore_dir) {
      char *t = snap_tap_of(v);
      build_restore_calls(v, t);
      free(t);
    } else {
      build_boot_calls(v);
    }
    w->aux[0] = s = 100;
  }
  if (s >= 100 && s < 100 + VM_MAX_CALLS + 1) { /* issue call s-100 */
    int i = (int)(s - 100);
    if (i >= v->ncalls) {
      calls_clear(v);
      w->aux[0] = s = 50;
    } else {
      int e = api_call(v, v->calls[i].method, v->calls[i].path, v->calls[i].body);
      if (e)
        return cl_vm_fail(L, v, 1, 1, e, "start: %s %s: %s", v->calls[i].method, v->calls[i].path,
                          strerror(e));
      w->aux[0] = 200 + i;
      return VM_WAIT;
    }
  }
  if (s >= 200 && s < 200 + VM_MAX_CALLS) {
    r = api_await(L, v, w, 1);
    if (r != 1) {
      calls_clear(v);
      return r;
    }
    w->aux[0] = s + 1 - 100;
    return start_step(L, v, w);
  }
  if (s == 50) { /* connect to the agent through the vsock proxy */
    if (v->exited) goto gone;
    if (v->channel == CH_NONE || !v->chan.closed || vsock_try(v)) {
      w->aux[0] = s = 51;
    } else {
      if (w->state == CL_WAIT_TIMEOUT) goto timeout;
      if (v->vsock_fd < 0) cl_vm_poll_in(v, 20);
      return VM_WAIT;
    }
  }
  if (s == 51) {
    if (v->exited) goto gone;
    if (v->channel != CH_NONE && !v->chan.ready) {
      if (v->chan.closed) {
        if (v->chan.error[0] && strstr(v->chan.error, "protocol violation"))
          return cl_vm_fail(L, v, 1, 1, EPROTO, "start: %s", v->chan.error);
        w->aux[0] = 50; /* the connection dropped before READY: try again */
        cl_vm_poll_in(v, 20);
        return VM_WAIT;
      }
      if (w->state == CL_WAIT_TIMEOUT) goto timeout;
      return VM_WAIT;
    }
    v->state = VS_RUNNING;
    v->t_ready = cl_now_ns();
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (double)(v->t_ready - v->t_spawn) / 1e9);
    lua_setfield(L, -2, "boot_seconds");
    lua_pushstring(L, v->fc_version);
    lua_setfield(L, -2, "firecracker_version");
    cl_vm_audit(v, L, "vm.ready", lua_gettop(L));
    lua_pop(L, 1);
    lua_pushvalue(L, 1);
    return 1;
  }
  return cl_vm_fail(L, v, 1, 0, EINVAL, "start: bad step %ld", s);
gone:
  calls_clear(v);
  return cl_vm_fail(L, v, 1, 1, ECHILD, "start: the VMM %s during start",
                    v->exit_signal ? "was killed" : "exited");
timeout:
  calls_clear(v);
  return cl_vm_fail(L, v, 1, 1, ETIMEDOUT, "start: the guest agent was not ready after %.0f s",
                    v->ready_timeout);
}

static int patch_state_step(lua_State *L, vm *v, cl_wait *w, const char *state, int new_state,
                            const char *kind) {
  if (w->aux[0] == 0) {
    char body[64];
    snprintf(body, sizeof body, "{\"state\":\"%s\"}", state);
    int e = api_call(v, "PATCH", "/vm", body);
    if (e) return cl_vm_fail(L, v, 0, 0, e, "PATCH /vm: %s", strerror(e));
    w->aux[0] = 1;
    return VM_WAIT;
  }
  int r = api_await(L, v, w, 0);
  if (r != 1) return r;
  v->state = new_state;
  lua_createtable(L, 0, 1);
  lua_pushstring(L, cl_vm_state_name(v->state));
  lua_setfield(L, -2, "state");
  cl_vm_audit(v, L, kind, lua_gettop(L));
  lua_pop(L, 1);
  lua_pushboolean(L, 1);
  return 1;
}

static int snapshot_step(lua_State *L, vm *v, cl_wait *w) {
  int r;
  char err[400];
  switch (w->aux[0]) {
  case 0:
    v->was_running = v->state == VS_RUNNING;
    if (v->was_running) {
      int e = api_call(v, "PATCH", "/vm", "{\"state\":\"Paused\"}");
      if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: %s", strerror(e));
      w->aux[0] = 1;
      return VM_WAIT;
    }
    w->aux[0] = 2;
    return snapshot_step(L, v, w);
  case 1:
    r = api_await(L, v, w, 0);
    if (r != 1) return r;
    v->state = VS_PAUSED;
    w->aux[0] = 2;
    /* fall through */
  case 2: {
    cJSON *b = cJSON_CreateObject();
    char p[600];
    /* A jailed Firecracker sees only its run directory: it writes there, the files move after. */
    const char *dir = v->jailed ? v->rundir : v->op_path;
    snprintf(p, sizeof p, "%s/vmstate.fc", dir);
    cJSON_AddStringToObject(b, "snapshot_path", p);
    snprintf(p, sizeof p, "%s/memory.fc", dir);
    cJSON_AddStringToObject(b, "mem_file_path", p);
    cJSON_AddStringToObject(b, "snapshot_type", "Full");
    char *body = cJSON_PrintUnformatted(b);
    cJSON_Delete(b);
    int e = body ? api_call(v, "PUT", "/snapshot/create", body) : ENOMEM;
    free(body);
    if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: %s", strerror(e));
    w->aux[0] = 3;
    return VM_WAIT;
  }
  case 3: {
    r = api_await(L, v, w, 0);
    if (r != 1) return r;
    int e = 0;
    if (v->jailed) {
      static const char *const files[] = {"vmstate.fc", "memory.fc"};
      for (int i = 0; i < 2 && !e; i++)
        e = move_file(v->rundir, v->op_path, files[i], err, sizeof err);
      if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: %s", err);
    }
    e = write_meta(v, err, sizeof err);
    if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: %s", err);
    if (v->was_running) {
      e = api_call(v, "PATCH", "/vm", "{\"state\":\"Resumed\"}");
      if (e) return cl_vm_fail(L, v, 0, 0, e, "snapshot: %s", strerror(e));
      w->aux[0] = 4;
      return VM_WAIT;
    }
    w->aux[0] = 5;
    return snapshot_step(L, v, w);
  }
  case 4:
    r = api_await(L, v, w, 0);
    if (r != 1) return r;
    v->state = VS_RUNNING;
    w->aux[0] = 5;
    /* fall through */
  case 5:
    return cl_vm_snapshot_done(L, v, "firecracker", "memory.fc");
  default:
    return cl_vm_fail(L, v, 0, 0, EINVAL, "snapshot: bad step");
  }
}

/* FlushMetrics, then the last line of the metrics file. */
static int metrics_step(lua_State *L, vm *v, cl_wait *w) {
  if (w->aux[0] == 0) {
    int e = api_call(v, "PUT", "/actions", "{\"action_type\":\"FlushMetrics\"}");
    if (e) return cl_vm_fail(L, v, 0, 0, e, "metrics: %s", strerror(e));
    w->aux[0] = 1;
    return VM_WAIT;
  }
  int r = api_await(L, v, w, 0);
  if (r != 1) return r;
  char p[300];
  snprintf(p, sizeof p, "%s/metrics.json", v->rundir);
  FILE *f = fopen(p, "re");
  if (!f) return cl_vm_fail(L, v, 0, 0, errno, "metrics: %s: %s", p, strerror(errno));
  char *last = NULL;
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  while ((n = getline(&line, &cap, f)) > 0) {
    if (n > 1) {
      free(last);
      last = strdup(line);
    }
  }
  free(line);
  fclose(f);
  if (!last) return cl_vm_fail(L, v, 0, 0, ENODATA, "metrics: Firecracker wrote no metrics");
  int ok = cl_json_decode(L, last, strlen(last));
  free(last);
  return ok ? 1 : 2;
}

static int ask_ctrl_alt_del(vm *v) {
  return api_call(v, "PUT", "/actions", "{\"action_type\":\"SendCtrlAltDel\"}");
}

int cl_fc_step(lua_State *L, vm *v, cl_wait *w, int op) {
  switch (op) {
  case OP_START:
    return start_step(L, v, w);
  case OP_PAUSE:
    return patch_state_step(L, v, w, "Paused", VS_PAUSED, "vm.pause");
  case OP_RESUME:
    return patch_state_step(L, v, w, "Resumed", VS_RUNNING, "vm.resume");
  case OP_SNAPSHOT:
    return snapshot_step(L, v, w);
  case OP_SHUTDOWN:
    return cl_shutdown_step(L, v, w, ask_ctrl_alt_del);
  case OP_METRICS:
    return metrics_step(L, v, w);
  default:
    return cl_vm_fail(L, v, 0, 0, EINVAL, "unknown operation");
  }
}
