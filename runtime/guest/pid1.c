/*
 * clawlua-agent: the life of PID 1 (see agent_int.h). At boot: the pseudo file systems, the
 * kernel modules listed in /etc/clawlua/modules*, the clawlua.* kernel command line (channel,
 * root disk, network), the input devices that carry the power button. At the end: power-off or
 * reboot, asked by the host, the power button or a signal.
 */
#include "agent_int.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* PID 1 set-up                                                                               */

static void mount_fs(const char *src, const char *dst, const char *type, unsigned long fl,
                     const char *data) {
  mkdir(dst, 0755);
  if (mount(src, dst, type, fl, data) < 0 && errno != EBUSY)
    cl_log("mount %s on %s: %s", type, dst, strerror(errno));
}

static void load_modules(const char *list) {
  if (access("/proc/modules", F_OK) < 0) return; /* a kernel without modules has it built in */
  FILE *f = fopen(list, "re");
  if (!f) return;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    line[strcspn(line, "\r\n")] = 0;
    if (!line[0] || line[0] == '#') continue;
    int fd = open(line, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      cl_log("module %s: %s", line, strerror(errno));
      continue;
    }
    if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
      cl_log("module %s: %s", line, strerror(errno));
    close(fd);
  }
  fclose(f);
}

static void open_inputs(void) {
  DIR *d = opendir("/dev/input");
  if (!d) return;
  struct dirent *de;
  while ((de = readdir(d)) &&
         cl_agent.ninputs < (int)(sizeof cl_agent.inputs / sizeof cl_agent.inputs[0])) {
    if (strncmp(de->d_name, "event", 5) != 0) continue;
    char p[300];
    snprintf(p, sizeof p, "/dev/input/%s", de->d_name);
    int fd = open(p, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) cl_agent.inputs[cl_agent.ninputs++] = fd;
  }
  closedir(d);
}

static void lo_up(void) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strcpy(ifr.ifr_name, "lo");
  if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP;
    ioctl(s, SIOCSIFFLAGS, &ifr);
  }
  close(s);
}

/* The sandbox network from `clawlua.net=ADDR/LEN,GATEWAY,DNS` on the kernel command line
 * (clawlua.sandbox.net): eth0 gets the address and comes up, the default route goes through
 * the gateway, /etc/resolv.conf names DNS (the host's forwarder, the guest's only resolver),
 * and IPv6 is turned off on eth0 (the sandbox network is IPv4 only). */
static int set_addr(int s, const char *ifname, unsigned long req, in_addr_t a) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = a;
  return ioctl(s, req, &ifr);
}

static void configure_net(const char *spec) {
  char buf[256], *addr = buf, *slash, *gw, *dns, *end;
  struct in_addr a, g4, d;
  snprintf(buf, sizeof buf, "%s", spec);
  slash = strchr(buf, '/');
  gw = slash ? strchr(slash, ',') : NULL;
  dns = gw ? strchr(gw + 1, ',') : NULL;
  if (!dns) {
    cl_log("clawlua.net=%s: expected ADDRESS/LEN,GATEWAY,DNS", spec);
    return;
  }
  *slash = *gw++ = *dns++ = 0;
  errno = 0;
  unsigned long len = strtoul(slash + 1, &end, 10);
  if (errno || *end || end == slash + 1 || len < 1 || len > 32 ||
      inet_pton(AF_INET, addr, &a) != 1 || inet_pton(AF_INET, gw, &g4) != 1 ||
      inet_pton(AF_INET, dns, &d) != 1) {
    cl_log("clawlua.net=%s: expected ADDRESS/LEN,GATEWAY,DNS", spec);
    return;
  }
  int fd = open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    if (write(fd, "1\n", 2) < 0) cl_log("eth0: disable_ipv6: %s", strerror(errno));
    close(fd);
  }
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return;
  /* virtio_net probes its device while the module loads; allow a moment all the same */
  int tries = 0;
  while (set_addr(s, "eth0", SIOCSIFADDR, a.s_addr) < 0) {
    if (errno != ENODEV || ++tries > 100) {
      cl_log("eth0: address %s: %s", addr, strerror(errno));
      close(s);
      return;
    }
    usleep(10000);
  }
  if (set_addr(s, "eth0", SIOCSIFNETMASK, htonl(len == 32 ? 0xffffffffu : ~(0xffffffffu >> len))) <
      0)
    cl_log("eth0: netmask /%lu: %s", len, strerror(errno));
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strcpy(ifr.ifr_name, "eth0");
  if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) cl_log("eth0: up: %s", strerror(errno));
  }
  struct rtentry rt;
  memset(&rt, 0, sizeof rt);
  ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
  ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
  struct sockaddr_in *gwa = (struct sockaddr_in *)&rt.rt_gateway;
  gwa->sin_family = AF_INET;
  gwa->sin_addr = g4;
  rt.rt_flags = RTF_UP | RTF_GATEWAY;
  rt.rt_dev = (char *)"eth0";
  if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
    cl_log("default route via %s: %s", gw, strerror(errno));
  close(s);
  mkdir("/etc", 0755);
  FILE *f = fopen("/etc/resolv.conf", "we");
  if (!f) {
    cl_log("/etc/resolv.conf: %s", strerror(errno));
    return;
  }
  fprintf(f, "nameserver %s\noptions attempts:2 timeout:2\n", dns);
  fclose(f);
}

/* Reads clawlua.* options from the kernel command line. */
static void read_cmdline(char *root, size_t rootlen, char *net, size_t netlen) {
  char buf[4096];
  int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return;
  buf[n] = 0;
  for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
    if (strcmp(tok, "clawlua.channel=vsock") == 0)
      cl_agent.mode = CH_VSOCK;
    else if (strcmp(tok, "clawlua.channel=serial") == 0)
      cl_agent.mode = CH_SERIAL;
    else if (strncmp(tok, "clawlua.vsock_port=", 19) == 0)
      cl_agent.vsock_port = (uint32_t)strtoul(tok + 19, NULL, 10);
    else if (strncmp(tok, "clawlua.root=", 13) == 0)
      snprintf(root, rootlen, "%s", tok + 13);
    else if (strncmp(tok, "clawlua.net=", 12) == 0)
      snprintf(net, netlen, "%s", tok + 12);
  }
}

void cl_pid1_setup(void) {
  mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  int c = open("/dev/console", O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (c >= 0) {
    for (int i = 0; i < 3; i++) dup2(c, i);
    if (c > 2) close(c);
  }
  mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
  mount_fs("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mount_fs("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mount_fs("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  sethostname("clawlua", 7);
  lo_up();
  load_modules("/etc/clawlua/modules");
  char root[256] = "", net[256] = "";
  read_cmdline(root, sizeof root, net, sizeof net);
  if (net[0]) configure_net(net);
  if (cl_agent.mode == CH_VSOCK) load_modules("/etc/clawlua/modules.vsock");
  if (root[0]) {
    load_modules("/etc/clawlua/modules.ext4"); /* a disk for files: mounted on /mnt/root */
    mkdir("/mnt", 0755);
    mkdir("/mnt/root", 0755);
    if (mount(root, "/mnt/root", "ext4", 0, NULL) < 0 &&
        ((errno != EROFS && errno != EACCES) ||
         mount(root, "/mnt/root", "ext4", MS_RDONLY, NULL) < 0))
      cl_log("mount %s: %s", root, strerror(errno));
  }
  open_inputs();
  /* Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) becomes SIGINT to PID 1 instead of a reset. */
  reboot(LINUX_REBOOT_CMD_CAD_OFF);
  umask(022);
  setenv("PATH", AGENT_PATH, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Power                                                                                      */

void cl_power_off(int action) {
  cl_log("%s", action == CLA_ACTION_REBOOT ? "rebooting" : "powering off");
  /* Not PID 1 (--fd on a host): the exit status tells whoever runs it what the guest did. */
  if (!cl_agent.pid1) exit(action == CLA_ACTION_REBOOT ? 101 : 100);
  sync();
  kill(-1, SIGTERM);
  uint64_t until = cl_now_ms() + 300;
  while (cl_now_ms() < until) {
    if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) break;
    usleep(10000);
  }
  kill(-1, SIGKILL);
  sync();
  umount2("/mnt/root", MNT_DETACH);
  /* A kernel without ACPI cannot power off: it resets (reboot=t), and QEMU's -no-reboot exits. */
  int no_acpi = access("/sys/firmware/acpi", F_OK) < 0 && errno == ENOENT;
  reboot(action == CLA_ACTION_REBOOT || no_acpi ? LINUX_REBOOT_CMD_RESTART
                                                : LINUX_REBOOT_CMD_POWER_OFF);
  _exit(0); /* PID 1 exiting panics the kernel: with panic=1 that too ends the VM */
}

void cl_handle_shutdown(uint32_t id, const unsigned char *p, uint32_t len) {
  uint64_t action = CLA_ACTION_POWEROFF;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  while (cla_tlv_next(&t) > 0)
    if (t.tag == CLA_T_ACTION) cla_tlv_u64(&t, &action);
  cl_send_frame(CLA_OK, id, NULL, 0);
  cl_agent.shutting_down = 1;
  cl_agent.shutdown_action = action == CLA_ACTION_REBOOT ? CLA_ACTION_REBOOT : CLA_ACTION_POWEROFF;
  cl_agent.shutdown_id = id;
}

void cl_check_power_button(int fd) {
  struct input_event ev[16];
  ssize_t n;
  while ((n = read(fd, ev, sizeof ev)) > 0)
    for (size_t i = 0; i < (size_t)n / sizeof ev[0]; i++)
      if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1)
        cl_power_off(CLA_ACTION_POWEROFF);
}
