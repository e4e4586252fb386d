/*
 * clawlua-agent: file transfer (see agent_int.h). A write goes to a temporary name in the
 * target's directory and is renamed over the target at the end; a read announces size and mode,
 * then sends the file in chunks while the host keeps up, refusing more than the limit.
 */
#include "agent_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_MAX_READ ((uint64_t)64 << 20)

void cl_handle_write(uint32_t id, const unsigned char *p, uint32_t len) {
  const unsigned char *path = NULL;
  uint32_t plen = 0;
  uint64_t mode = 0644, size = UINT64_MAX, v;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  int r;
  while ((r = cla_tlv_next(&t)) > 0) {
    if (t.tag == CLA_T_PATH)
      path = t.val, plen = t.len;
    else if (t.tag == CLA_T_MODE && cla_tlv_u64(&t, &v))
      mode = v & 07777;
    else if (t.tag == CLA_T_SIZE && cla_tlv_u64(&t, &v))
      size = v;
  }
  if (r < 0 || !path || plen == 0 || plen >= 4096 || memchr(path, 0, plen) || path[0] != '/') {
    cl_send_error(id, EINVAL, "write: an absolute path is required");
    return;
  }
  job *j = cl_job_new(J_WRITE, id);
  if (!j) return;
  j->path = strndup((const char *)path, plen);
  const char *slash = j->path ? strrchr(j->path, '/') : NULL;
  if (!j->path || !slash || !slash[1]) {
    cl_send_error(id, EINVAL, "write %s: not a file path", j->path ? j->path : "?");
    cl_job_free(j);
    return;
  }
  /* A temporary name in the same directory, renamed over the target at the end: readers never
   * see a partial file. */
  if (asprintf(&j->tmp, "%.*s/.%s.clawlua-%u", (int)(slash - j->path), j->path, slash + 1, id) <
      0) {
    j->tmp = NULL;
    cl_send_error(id, ENOMEM, "write: out of memory");
    cl_job_free(j);
    return;
  }
  j->fd = open(j->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode);
  if (j->fd < 0) {
    int e = errno;
    free(j->tmp);
    j->tmp = NULL;
    cl_send_error(id, e, "write %s: %s", j->path, strerror(e));
    cl_job_free(j);
    return;
  }
  fchmod(j->fd, (mode_t)mode); /* the umask must not narrow the mode asked for */
  j->size = size;
  cl_send_frame(CLA_OK, id, NULL, 0);
}

void cl_handle_wdata(uint32_t id, const unsigned char *p, uint32_t len) {
  job *j = cl_job_find(id);
  if (!j || j->kind != J_WRITE || j->error) return;
  if (j->done + len > j->size) {
    j->error = EFBIG;
    snprintf(j->errmsg, sizeof j->errmsg, "more data than the %llu bytes announced",
             (unsigned long long)j->size);
    return;
  }
  while (len > 0) {
    ssize_t n = write(j->fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      j->error = errno;
      snprintf(j->errmsg, sizeof j->errmsg, "%s", strerror(errno));
      return;
    }
    p += n;
    len -= (uint32_t)n;
    j->done += (uint64_t)n;
  }
}

void cl_handle_wend(uint32_t id) {
  job *j = cl_job_find(id);
  if (!j || j->kind != J_WRITE) return;
  if (!j->error && j->size != UINT64_MAX && j->done != j->size) {
    j->error = EIO;
    snprintf(j->errmsg, sizeof j->errmsg, "%llu of %llu bytes arrived", (unsigned long long)j->done,
             (unsigned long long)j->size);
  }
  if (!j->error && fsync(j->fd) < 0) {
    j->error = errno;
    snprintf(j->errmsg, sizeof j->errmsg, "fsync: %s", strerror(errno));
  }
  if (!j->error && rename(j->tmp, j->path) < 0) {
    j->error = errno;
    snprintf(j->errmsg, sizeof j->errmsg, "rename: %s", strerror(errno));
  }
  if (j->error) {
    cl_send_error(id, j->error, "write %s: %s", j->path, j->errmsg);
  } else {
    free(j->tmp); /* renamed: nothing to remove */
    j->tmp = NULL;
    tlvbuf t = {.n = 0};
    cl_tlv_u64(&t, CLA_T_SIZE, j->done);
    cl_send_frame(CLA_OK, id, t.b, t.n);
  }
  cl_job_free(j);
}

void cl_handle_read(uint32_t id, const unsigned char *p, uint32_t len) {
  const unsigned char *path = NULL;
  uint32_t plen = 0;
  uint64_t max = DEFAULT_MAX_READ, v;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  int r;
  while ((r = cla_tlv_next(&t)) > 0) {
    if (t.tag == CLA_T_PATH)
      path = t.val, plen = t.len;
    else if (t.tag == CLA_T_MAX && cla_tlv_u64(&t, &v))
      max = v;
  }
  if (r < 0 || !path || plen == 0 || plen >= 4096 || memchr(path, 0, plen)) {
    cl_send_error(id, EINVAL, "read: a path is required");
    return;
  }
  char pbuf[4096];
  memcpy(pbuf, path, plen);
  pbuf[plen] = 0;
  int fd = open(pbuf, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) < 0) {
    int e = errno;
    if (fd >= 0) close(fd);
    cl_send_error(id, e, "read %s: %s", pbuf, strerror(e));
    return;
  }
  if (S_ISDIR(st.st_mode)) {
    close(fd);
    cl_send_error(id, EISDIR, "read %s: %s", pbuf, strerror(EISDIR));
    return;
  }
  if (S_ISREG(st.st_mode) && (uint64_t)st.st_size > max) {
    close(fd);
    cl_send_error(id, EFBIG, "read %s: the file has %llu bytes, more than the limit of %llu", pbuf,
                  (unsigned long long)st.st_size, (unsigned long long)max);
    return;
  }
  job *j = cl_job_new(J_READ, id);
  if (!j) {
    close(fd);
    return;
  }
  j->fd = fd;
  j->max = max;
  j->path = strdup(pbuf);
  tlvbuf tb = {.n = 0};
  cl_tlv_u64(&tb, CLA_T_SIZE, S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0);
  cl_tlv_u64(&tb, CLA_T_MODE, st.st_mode & 07777);
  cl_send_frame(CLA_RINFO, id, tb.b, tb.n);
}

/* Sends the next chunk of a file being read; returns 1 when the job is finished. */
int cl_pump_read(job *j) {
  static unsigned char buf[CLA_CHUNK];
  ssize_t n;
  do n = read(j->fd, buf, sizeof buf);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) return 0;
  if (n < 0) {
    cl_send_error(j->id, errno, "read %s: %s", j->path ? j->path : "?", strerror(errno));
    return 1;
  }
  if (n == 0) {
    cl_send_frame(CLA_REND, j->id, NULL, 0);
    return 1;
  }
  if (j->done + (uint64_t)n > j->max) { /* it grew while we read it */
    cl_send_error(j->id, EFBIG, "read %s: more than the limit of %llu bytes",
                  j->path ? j->path : "?", (unsigned long long)j->max);
    return 1;
  }
  j->done += (uint64_t)n;
  cl_send_frame(CLA_RDATA, j->id, buf, (size_t)n);
  return 0;
}
