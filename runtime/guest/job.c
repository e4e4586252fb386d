/*
 * clawlua-agent: the table of requests in progress (running commands, files being written,
 * files being read), one per request id, at most CLA_MAX_JOBS (see agent_int.h).
 */
#include "agent_int.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

job *cl_jobs;
static int njobs;

job *cl_job_find(uint32_t id) {
  for (job *j = cl_jobs; j; j = j->next)
    if (j->id == id) return j;
  return NULL;
}

void cl_job_free(job *j) {
  for (job **p = &cl_jobs; *p; p = &(*p)->next)
    if (*p == j) {
      *p = j->next;
      break;
    }
  njobs--;
  cl_close_fd(&j->out_fd);
  cl_close_fd(&j->err_fd);
  cl_close_fd(&j->in_fd);
  cl_close_fd(&j->fd);
  if (j->tmp) unlink(j->tmp);
  free(j->tmp);
  free(j->path);
  free(j->in_buf);
  free(j);
}

job *cl_job_new(int kind, uint32_t id) {
  if (njobs >= CLA_MAX_JOBS) {
    cl_send_error(id, EAGAIN, "agent: more than %d requests in progress", CLA_MAX_JOBS);
    return NULL;
  }
  if (cl_job_find(id)) {
    cl_send_error(id, EEXIST, "agent: request id %u is in use", id);
    return NULL;
  }
  job *j = calloc(1, sizeof *j);
  if (!j) {
    cl_send_error(id, ENOMEM, "agent: out of memory");
    return NULL;
  }
  j->kind = kind;
  j->id = id;
  j->out_fd = j->err_fd = j->in_fd = j->fd = -1;
  j->next = cl_jobs;
  cl_jobs = j;
  njobs++;
  return j;
}
