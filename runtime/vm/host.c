/*
 * The host side of a VM, at the bottom of runtime/vm/: what the kernel gives a VM before its
 * VMM runs (a tap, a run directory), and what decides how it runs (is /dev/kvm usable, has a
 * guest booted under it before: the KVM verdict cache, the TSC frequency). Calls nothing above.
 */
#include "vm.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <net/if.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

/* The host's TSC rate for tsc_early_khz=: what the kernel measured (its log, when it is still
 * there), else /proc/cpuinfo's "cpu MHz". */
static double mhz_after(const char *s, const char *key) {
  const char *p = strstr(s, key);
  if (!p) return 0;
  char *end;
  double mhz = strtod(p + strlen(key), &end);
  return end != p + strlen(key) && strncmp(end, " MHz", 4) == 0 ? mhz : 0;
}

int cl_vm_tsc_khz(void) {
  static int khz = -1;
  if (khz >= 0) return khz;
  khz = 0;
  double detected = 0, refined = 0;
  int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd >= 0) {
    char rec[1024];
    for (int i = 0; i < 20000; i++) {
      ssize_t n = read(fd, rec, sizeof rec - 1);
      if (n < 0 && errno == EPIPE) continue; /* a record was overwritten while we read */
      if (n <= 0) break;
      rec[n] = 0;
      double m;
      if ((m = mhz_after(rec, "tsc: Refined TSC clocksource calibration: ")) > 0)
        refined = m;
      else if ((m = mhz_after(rec, "tsc: Detected ")) > 0)
        detected = m;
    }
    close(fd);
  }
  double mhz = refined > 0 ? refined : detected;
  FILE *f = mhz > 0 ? NULL : fopen("/proc/cpuinfo", "re");
  if (f) {
    char line[256];
    while (fgets(line, sizeof line, f)) {
      char *colon = strchr(line, ':');
      if (strncmp(line, "cpu MHz", 7) != 0 || !colon) continue;
      char *end;
      mhz = strtod(colon + 1, &end);
      if (end != colon + 1 && mhz > 0) break;
      mhz = 0;
    }
    fclose(f);
  }
  if (mhz > 0) khz = (int)(mhz * 1000.0 + 0.5);
  return khz;
}

static int tap_up(const char *name) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return errno;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  int err = 0;
  if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
    err = errno;
  else {
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) err = errno;
  }
  close(s);
  return err;
}

/* Creates tap `name`; fails with EBUSY when any interface of that name exists (IFF_TUN_EXCL:
 * without it TUNSETIFF would silently attach to someone else's tap). */
int cl_vm_tap_create(const char *name, int persist, int *fdp) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return errno;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL;
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int e = errno;
    close(fd);
    return e;
  }
  if (persist && ioctl(fd, TUNSETPERSIST, 1) < 0) {
    int e = errno;
    close(fd);
    return e;
  }
  int e = tap_up(name);
  if (e) {
    if (persist) ioctl(fd, TUNSETPERSIST, 0);
    close(fd);
    return e;
  }
  if (persist) {
    close(fd);
    fd = -1;
  }
  *fdp = fd;
  return 0;
}

/* A persistent tap goes when it is made non-persistent and its last fd closes. */
void cl_vm_tap_delete(const char *name) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  if (ioctl(fd, TUNSETIFF, &ifr) == 0) ioctl(fd, TUNSETPERSIST, 0);
  close(fd);
}

int cl_vm_iface_exists(const char *name) {
  return if_nametoindex(name) != 0;
}

static int make_dirs(const char *path) {
  char p[256];
  snprintf(p, sizeof p, "%s", path);
  for (char *s = p + 1; *s; s++) {
    if (*s != '/') continue;
    *s = 0;
    if (mkdir(p, 0700) < 0 && errno != EEXIST) return errno;
    *s = '/';
  }
  if (mkdir(p, 0700) < 0 && errno != EEXIST) return errno;
  return 0;
}

int cl_vm_make_rundir(vm *v) {
  if (v->rundir_given) {
    /* its parent as needed, then the directory itself, which must not exist */
    char parent[sizeof v->rundir];
    snprintf(parent, sizeof parent, "%s", v->rundir);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
      *slash = 0;
      int e = make_dirs(parent);
      if (e) return e;
    }
    if (mkdir(v->rundir, 0700) < 0) {
      int e = errno;
      v->rundir[0] = 0;
      return e;
    }
    return 0;
  }
  char base[160];
  const char *xdg = getenv("XDG_RUNTIME_DIR");
  if (xdg && *xdg && strlen(xdg) < 100)
    snprintf(base, sizeof base, "%s/clawlua", xdg);
  else if (geteuid() == 0)
    snprintf(base, sizeof base, "/run/clawlua");
  else
    snprintf(base, sizeof base, "/tmp/clawlua-%u", (unsigned)geteuid());
  int e = make_dirs(base);
  if (e) return e;
  /* Unix socket paths in it (api.sock, v.sock) must fit in 108 bytes: long ids are left out. */
  if (strlen(base) + strlen(v->id) + 32 < 100)
    snprintf(v->rundir, sizeof v->rundir, "%s/%s.XXXXXX", base, v->id);
  else if (strlen(base) + 32 < 100)
    snprintf(v->rundir, sizeof v->rundir, "%s/vm.XXXXXX", base);
  else
    snprintf(v->rundir, sizeof v->rundir, "/tmp/clawlua-vm.XXXXXX");
  if (!mkdtemp(v->rundir)) {
    e = errno;
    v->rundir[0] = 0;
    return e;
  }
  return 0;
}

/* Removes what the runtime put in the run directory (never follows links out of it). */
void cl_vm_remove_rundir(vm *v, int keep_log) {
  if (!v->rundir[0]) return;
  DIR *d = opendir(v->rundir);
  int left = 0;
  if (d) {
    struct dirent *de;
    while ((de = readdir(d))) {
      if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
      char p[512];
      snprintf(p, sizeof p, "%s/%s", v->rundir, de->d_name);
      if (keep_log && strcmp(p, v->log_path) == 0) {
        left = 1;
        continue;
      }
      unlink(p);
    }
    closedir(d);
  }
  if (!left) {
    rmdir(v->rundir);
    v->rundir[0] = 0;
  }
}

static int kvm_device_ok(char *why, size_t n) {
  int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    snprintf(why, n, "/dev/kvm: %s", strerror(errno));
    return 0;
  }
  int api = ioctl(fd, KVM_GET_API_VERSION, 0);
  close(fd);
  if (api != KVM_API_VERSION) {
    snprintf(why, n, "/dev/kvm answers API version %d, not %d", api, KVM_API_VERSION);
    return 0;
  }
  return 1;
}

/* The verdict of a probe boot under KVM, cached per (host kernel, QEMU binary, guest kernel):
 * 1 boots, 0 does not, -1 not known yet. */
static void verdict_path(char *p, size_t n) {
  const char *c = getenv("XDG_CACHE_HOME");
  const char *h = getenv("HOME");
  if (!h || !*h) {
    const struct passwd *pw = getpwuid(getuid()); /* no HOME: the user's own, never /tmp */
    h = pw && pw->pw_dir ? pw->pw_dir : "/";
  }
  if (c && *c)
    snprintf(p, n, "%s/clawlua/kvm-verdicts", c);
  else
    snprintf(p, n, "%s/.cache/clawlua/kvm-verdicts", h);
}

static void verdict_key(vm *v, char *k, size_t n) {
  struct utsname u;
  struct stat sq, sk;
  char qpath[4096] = "";
  cl_find_executable(v->vmm ? v->vmm[0] : "qemu-system-x86_64", getenv("PATH"), qpath,
                     sizeof qpath);
  memset(&sq, 0, sizeof sq);
  memset(&sk, 0, sizeof sk);
  stat(qpath, &sq);
  stat(v->kernel ? v->kernel : "", &sk);
  uname(&u);
  snprintf(k, n, "%s|%s:%lld:%lld|%s:%lld:%lld", u.release, qpath, (long long)sq.st_size,
           (long long)sq.st_mtime, v->kernel ? v->kernel : "", (long long)sk.st_size,
           (long long)sk.st_mtime);
}

static int kvm_verdict(vm *v) {
  char p[512], key[1024], line[1200];
  verdict_path(p, sizeof p);
  verdict_key(v, key, sizeof key);
  FILE *f = fopen(p, "re");
  if (!f) return -1;
  int verdict = -1;
  size_t kl = strlen(key);
  while (fgets(line, sizeof line, f))
    if (strncmp(line, key, kl) == 0 && line[kl] == ' ')
      verdict = strncmp(line + kl + 1, "boots", 5) == 0;
  fclose(f);
  return verdict;
}

void cl_vm_record_kvm_verdict(vm *v, int boots) {
  char p[512], key[1024];
  verdict_path(p, sizeof p);
  verdict_key(v, key, sizeof key);
  char dir[512];
  snprintf(dir, sizeof dir, "%s", p);
  char *slash = strrchr(dir, '/');
  if (slash) {
    *slash = 0;
    make_dirs(dir);
  }
  FILE *f = fopen(p, "ae");
  if (!f) return;
  fprintf(f, "%s %s\n", key, boots ? "boots" : "fails");
  fclose(f);
}

/* Chooses the backend and accelerator for "auto" and says why. Returns 0 or an errno (no VMM
 * at all), with the reason in v->why. */
int cl_vm_choose_backend(vm *v, int want, int accel) {
  char kvmwhy[160] = "";
  int kvm = kvm_device_ok(kvmwhy, sizeof kvmwhy);
  char fcpath[4096], qpath[4096];
  int have_fc = cl_find_executable("firecracker", getenv("PATH"), fcpath, sizeof fcpath) == 0;
  int have_q = cl_find_executable("qemu-system-x86_64", getenv("PATH"), qpath, sizeof qpath) == 0;
  if (want == 0) { /* auto */
    if (have_fc && kvm) {
      v->backend = VM_FIRECRACKER;
      snprintf(v->why, sizeof v->why, "firecracker: %.200s found and /dev/kvm is usable", fcpath);
      return 0;
    }
    if (!have_q) {
      snprintf(v->why, sizeof v->why, "no VMM: %s, and qemu-system-x86_64 is not in PATH",
               have_fc ? kvmwhy : "firecracker is not in PATH");
      return ENOENT;
    }
    v->backend = VM_QEMU;
  } else {
    v->backend = want;
  }
  if (v->backend == VM_FIRECRACKER) {
    snprintf(v->why, sizeof v->why, "firecracker (asked for)%s%s", kvm ? "" : "; ",
             kvm ? "" : kvmwhy);
    return 0;
  }
  const char *fcnote = want      ? "asked for"
                       : have_fc ? "firecracker needs KVM"
                                 : "no firecracker in PATH";
  if (accel == 3) {
    v->kvm = 2;
    v->kvm_auto = 1;
    snprintf(v->why, sizeof v->why, "qemu: KVM to be proved by a probe boot (%s; probe asked for)",
             fcnote);
  } else if (accel == 2) {
    v->kvm = 0;
    snprintf(v->why, sizeof v->why, "qemu with TCG (%s; TCG asked for)", fcnote);
  } else if (accel == 1) {
    v->kvm = 1;
    snprintf(v->why, sizeof v->why, "qemu with KVM (%s; KVM asked for)", fcnote);
  } else if (!kvm) {
    v->kvm = 0;
    snprintf(v->why, sizeof v->why, "qemu with TCG (%s; %s)", fcnote, kvmwhy);
  } else {
    int verdict = kvm_verdict(v);
    v->kvm_auto = 1;
    if (verdict == 1) {
      v->kvm = 1;
      snprintf(v->why, sizeof v->why,
               "qemu with KVM (%s; a probe boot under KVM reached the agent)", fcnote);
    } else if (verdict == 0) {
      v->kvm = 0;
      snprintf(v->why, sizeof v->why,
               "qemu with TCG (%s; /dev/kvm exists but a probe boot under it "
               "failed: this KVM does not run stock kernels)",
               fcnote);
    } else {
      v->kvm = 2; /* probe at start: the probe boot is the real boot when it works */
      snprintf(v->why, sizeof v->why, "qemu: KVM to be proved by a probe boot (%s)", fcnote);
    }
  }
  return 0;
}

long cl_vm_host_mem_mib(void) {
  long pages = sysconf(_SC_PHYS_PAGES), ps = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || ps <= 0) return 1L << 20;
  return (long)((double)pages * (double)ps / (1024.0 * 1024.0));
}

void cl_vm_random_hex(char *out, size_t nbytes) {
  unsigned char r[16];
  if (nbytes > sizeof r) nbytes = sizeof r;
  if (getrandom(r, nbytes, 0) != (ssize_t)nbytes) {
    uint64_t t = cl_now_ns() ^ (uint64_t)getpid();
    memcpy(r, &t, nbytes < 8 ? nbytes : 8);
  }
  for (size_t i = 0; i < nbytes; i++) sprintf(out + 2 * i, "%02x", r[i]);
}
