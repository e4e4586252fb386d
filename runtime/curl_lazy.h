/*
 * libcurl, loaded on first use. Linking it would map its whole dependency chain (TLS, Kerberos,
 * LDAP, IDN, compression: ~25 libraries) into every clawlua process at exec, which costs ~4.5 ms
 * of a 7 ms start and most of the resident set of a short-lived `clawlua mcp`; most runs never
 * make an HTTP request. Files that use curl include this header instead of <curl/curl.h>: the
 * names below resolve to the functions dlopen found, once cl_curl_load() succeeded.
 */
#ifndef CLAWLUA_CURL_LAZY_H
#define CLAWLUA_CURL_LAZY_H

#define CURL_DISABLE_TYPECHECK 1 /* the typecheck macros would shadow the redirections below */
#include <curl/curl.h>
#include <stddef.h>

typedef struct cl_curl_api {
  CURLcode (*global_init)(long flags);
  curl_version_info_data *(*version_info)(CURLversion);
  CURL *(*easy_init)(void);
  void (*easy_cleanup)(CURL *);
  CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
  CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
  CURLcode (*easy_pause)(CURL *, int);
  const char *(*easy_strerror)(CURLcode);
  char *(*easy_escape)(CURL *, const char *, int);
  void (*free)(void *);
  CURLM *(*multi_init)(void);
  CURLMcode (*multi_cleanup)(CURLM *);
  CURLMcode (*multi_setopt)(CURLM *, CURLMoption, ...);
  CURLMcode (*multi_add_handle)(CURLM *, CURL *);
  CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
  CURLMcode (*multi_assign)(CURLM *, curl_socket_t, void *);
  CURLMcode (*multi_socket_action)(CURLM *, curl_socket_t, int, int *);
  CURLMsg *(*multi_info_read)(CURLM *, int *);
  const char *(*multi_strerror)(CURLMcode);
  struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
  void (*slist_free_all)(struct curl_slist *);
} cl_curl_api;

/* The loaded functions; NULL until cl_curl_load() succeeded. */
extern const cl_curl_api *cl_curl;

/* Loads libcurl (once) and runs curl_global_init. Returns 0, or an errno with the reason in
 * err ("libcurl.so.4: cannot open shared object file: ..."). Call it from the loop thread. */
int cl_curl_load(char *err, size_t errlen);

/* curl.h defines some of these names as macros of its own (the setopt/getinfo type checks). */
#undef curl_easy_setopt
#undef curl_easy_getinfo
#undef curl_multi_setopt

#define curl_global_init         (cl_curl->global_init)
#define curl_version_info        (cl_curl->version_info)
#define curl_easy_init           (cl_curl->easy_init)
#define curl_easy_cleanup        (cl_curl->easy_cleanup)
#define curl_easy_setopt         (cl_curl->easy_setopt)
#define curl_easy_getinfo        (cl_curl->easy_getinfo)
#define curl_easy_pause          (cl_curl->easy_pause)
#define curl_easy_strerror       (cl_curl->easy_strerror)
#define curl_easy_escape         (cl_curl->easy_escape)
#define curl_free                (cl_curl->free)
#define curl_multi_init          (cl_curl->multi_init)
#define curl_multi_cleanup       (cl_curl->multi_cleanup)
#define curl_multi_setopt        (cl_curl->multi_setopt)
#define curl_multi_add_handle    (cl_curl->multi_add_handle)
#define curl_multi_remove_handle (cl_curl->multi_remove_handle)
#define curl_multi_assign        (cl_curl->multi_assign)
#define curl_multi_socket_action (cl_curl->multi_socket_action)
#define curl_multi_info_read     (cl_curl->multi_info_read)
#define curl_multi_strerror      (cl_curl->multi_strerror)
#define curl_slist_append        (cl_curl->slist_append)
#define curl_slist_free_all      (cl_curl->slist_free_all)

#endif
