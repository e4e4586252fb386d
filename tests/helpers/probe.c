/*
 * clawlua-probe: a small static program the seccomp and jail specs and benchmarks run as the
 * confined workload. Each subcommand makes one kind of system call and prints the outcome as
 * "ok" or "errno N", so a test sees exactly what the kernel answered.
 *
 *   socket inet|unix      ptrace             unshare            mount
 *   open PATH [w]         mkdir PATH         connect IP PORT    caps
 *   alloc MIB             fork N             getpid N / getppid N (prints ns per call)
 *   pid                   write PATH TEXT    ls DIR             ifaces
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int result(long r) {
  if (r < 0)
    printf("errno %d\n", errno);
  else
    printf("ok\n");
  return 0;
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: clawlua-probe COMMAND [ARGS]\n");
    return 2;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "socket") && argc > 2)
    return result(socket(!strcmp(argv[2], "inet") ? AF_INET : AF_UNIX, SOCK_STREAM, 0));
  if (!strcmp(cmd, "ptrace")) return result(ptrace(PTRACE_TRACEME, 0, NULL, NULL));
  if (!strcmp(cmd, "unshare")) return result(unshare(CLONE_NEWUTS));
  if (!strcmp(cmd, "mount")) return result(mount("none", "/tmp", "tmpfs", 0, NULL));
  if (!strcmp(cmd, "open") && argc > 2)
    return result(open(argv[2], argc > 3 ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY, 0644));
  if (!strcmp(cmd, "mkdir") && argc > 2) return result(mkdir(argv[2], 0755));
  if (!strcmp(cmd, "write") && argc > 3) {
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return result(fd);
    return result(write(fd, argv[3], strlen(argv[3])));
  }
  if (!strcmp(cmd, "connect") && argc > 3) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return result(s);
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)atoi(argv[3]));
    inet_pton(AF_INET, argv[2], &sin.sin_addr);
    return result(connect(s, (struct sockaddr *)&sin, sizeof sin));
  }
  if (!strcmp(cmd, "pid")) {
    printf("%d\n", (int)getpid());
    return 0;
  }
  if (!strcmp(cmd, "caps")) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
      if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10) || !strncmp(line, "Uid", 3))
        fputs(line, stdout);
    if (f) fclose(f);
    return 0;
  }
  if (!strcmp(cmd, "ls") && argc > 2) {
    DIR *d = opendir(argv[2]);
    if (!d) return result(-1);
    struct dirent *de;
    while ((de = readdir(d)))
      if (de->d_name[0] != '.') printf("%s\n", de->d_name);
    closedir(d);
    return 0;
  }
  if (!strcmp(cmd, "ifaces")) {
    FILE *f = fopen("/proc/net/dev", "r");
    char line[512];
    int n = 0;
    while (f && fgets(line, sizeof line, f)) {
      char *c = strchr(line, ':');
      if (!c || n++ < 0) continue;
      *c = 0;
      char *s = line;
      while (*s == ' ') s++;
      printf("%s\n", s);
    }
    if (f) fclose(f);
    return 0;
  }
  if (!strcmp(cmd, "alloc") && argc > 2) {
    long mib = atol(argv[2]);
    for (long i = 0; i < mib; i++) {
      char *p = malloc(1 << 20);
      if (!p) return result(-1);
      memset(p, 1, 1 << 20);
    }
    printf("allocated %ld MiB\n", mib);
    return 0;
  }
  if (!strcmp(cmd, "fork") && argc > 2) {
    int n = atoi(argv[2]), made = 0, err = 0;
    for (int i = 0; i < n; i++) {
      pid_t p = fork();
      if (p == 0) {
        pause();
        _exit(0);
      }
      if (p < 0) {
        err = errno;
        break;
      }
      made++;
    }
    printf("forked %d errno %d\n", made, err);
    fflush(stdout);
    kill(0, SIGKILL);
    return 0;
  }
  if ((!strcmp(cmd, "getpid") || !strcmp(cmd, "getppid")) && argc > 2) {
    long n = atol(argv[2]);
    long nr = !strcmp(cmd, "getpid") ? SYS_getpid : SYS_getppid;
    double t0 = now_ns();
    for (long i = 0; i < n; i++) syscall(nr);
    printf("%.2f\n", (now_ns() - t0) / (double)n);
    return 0;
  }
  fprintf(stderr, "clawlua-probe: unknown command %s\n", cmd);
  return 2;
}
