/* libcurl loaded with dlopen on first use (why: curl_lazy.h). */
#include "curl_lazy.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>

const cl_curl_api *cl_curl;

static cl_curl_api api;
static int load_error; /* a failed load is not tried again: the answer stays the same */
static char load_msg[256];

/* The symbol names, in the order of the fields of cl_curl_api. */
static const char *const names[] = {
    "curl_global_init",    "curl_version_info",        "curl_easy_init",
    "curl_easy_cleanup",   "curl_easy_setopt",         "curl_easy_getinfo",
    "curl_easy_pause",     "curl_easy_strerror",       "curl_easy_escape",
    "curl_free",           "curl_multi_init",          "curl_multi_cleanup",
    "curl_multi_setopt",   "curl_multi_add_handle",    "curl_multi_remove_handle",
    "curl_multi_assign",   "curl_multi_socket_action", "curl_multi_info_read",
    "curl_multi_strerror", "curl_slist_append",        "curl_slist_free_all",
};

_Static_assert(sizeof names / sizeof names[0] == sizeof(cl_curl_api) / sizeof(void (*)(void)),
               "one name per function of cl_curl_api");

int cl_curl_load(char *err, size_t errlen) {
  if (cl_curl) return 0;
  if (!load_error) {
    /* RTLD_LOCAL: curl's dependencies do not leak into the symbols other libraries see. */
    void *h = dlopen("libcurl.so.4", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      load_error = ENOENT;
      snprintf(load_msg, sizeof load_msg, "cannot load libcurl: %s", dlerror());
    }
    void (**slot)(void) = (void (**)(void))(void *)&api;
    for (size_t i = 0; h && i < sizeof names / sizeof names[0]; i++) {
      void *f = dlsym(h, names[i]);
      if (!f) {
        load_error = ENOSYS;
        snprintf(load_msg, sizeof load_msg, "libcurl has no %s", names[i]);
        break;
      }
      /* POSIX: a function's address round-trips through void * (dlsym's contract). */
      *(void **)&slot[i] = f;
    }
    if (!load_error && api.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      load_error = EIO;
      snprintf(load_msg, sizeof load_msg, "curl_global_init failed");
    }
    if (!load_error) {
      cl_curl = &api; /* the library stays loaded for the life of the process */
      return 0;
    }
  }
  snprintf(err, errlen, "%s", load_msg);
  return load_error;
}
