/* System calls beyond files and processes: sockets (socketcall and the
 * direct calls, Unix and loopback TCP and UDP, descriptors passed with
 * SCM_RIGHTS, socket options), positioned I/O, record locks, event
 * descriptors (epoll, eventfd, timerfd, inotify), select and its
 * relatives, ids and scheduling, POSIX timers, sigqueue, System V
 * message queues, semaphores and shared memory, futexes shared between processes, signalfd, splice and tee, extended
 * attributes, the old time calls, shared memory (anonymous across a fork,
 * and files mapped MAP_SHARED). Every line printed must read the same
 * under popek as natively: no pids, ports or times. argv[1]: a directory
 * to work in. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/xattr.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <utime.h>

#define T(x)                                                                      \
    do {                                                                          \
        errno = 0;                                                                \
        long r_ = (long)(x);                                                      \
        printf("%-48s -> %ld %s\n", #x, r_, r_ < 0 ? strerror(errno) : "");      \
        fflush(stdout);                                                           \
    } while (0)

static char dir[200];
static char *in_dir(const char *name) {
    static char p[2][300];
    static int k;
    k ^= 1;
    snprintf(p[k], sizeof p[k], "%s/%s", dir, name);
    return p[k];
}

static void positioned_io(void) {
    int fd = open(in_dir("pio"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    char b[32] = {0};
    T(pwrite(fd, "abcdefgh", 8, 4));
    T(pread(fd, b, 4, 6));
    printf("pread: %s\n", b);
    struct iovec iv[2] = {{b, 2}, {b + 2, 2}};
    T(preadv(fd, iv, 2, 4));
    T(pwritev(fd, iv, 2, 20));
    T(lseek(fd, 0, SEEK_CUR));
    T(fallocate(fd, 0, 0, 8192));
    T(lseek(fd, 0, SEEK_END));
    T(readahead(fd, 0, 4096));
    T(sync_file_range(fd, 0, 0, 0));
    T(posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL));
    T(flock(fd, LOCK_EX));
    T(flock(fd, LOCK_UN));
    T(pread(1000, b, 1, 0));
    /* Record locks: the child sees the parent's. */
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 2, .l_len = 3};
    T(fcntl(fd, F_SETLK, &l));
    pid_t ch = fork();
    if (ch == 0) {
        struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
        fcntl(fd, F_GETLK, &q);
        printf("child sees lock type %d start %ld len %ld by its parent %d\n", q.l_type,
               (long)q.l_start, (long)q.l_len, q.l_pid == getppid());
        errno = 0;
        int r = fcntl(fd, F_SETLK, &q);
        printf("child's lock: %d %s\n", r, strerror(errno));
        fflush(stdout);
        _exit(0);
    }
    waitpid(ch, 0, 0);
    l.l_type = F_UNLCK;
    T(fcntl(fd, F_SETLK, &l));
    close(fd);
    int mf = memfd_create("m", MFD_CLOEXEC);
    T(write(mf, "memfd!", 6));
    memset(b, 0, sizeof b);
    T(pread(mf, b, 6, 0));
    printf("memfd: %s\n", b);
    T(fcntl(mf, F_GETFD));
}

static void paths_and_ids(void) {
    T(mknod(in_dir("fifo"), S_IFIFO | 0644, 0));
    struct stat st;
    T(stat(in_dir("fifo"), &st));
    printf("a fifo: %d\n", S_ISFIFO(st.st_mode));
    T(unlink(in_dir("fifo")));
    int d = open(dir, O_RDONLY | O_DIRECTORY);
    T(fchdir(d));
    close(d);
    char cwd[300];
    printf("cwd is the directory: %d\n", getcwd(cwd, sizeof cwd) && strcmp(cwd, dir) == 0);
    T(chroot("/nonexistent"));
    T(setuid(getuid()));
    T(setgid(getgid()));
    T(setreuid(-1, -1));
    T(setresgid(-1, -1, -1));
    uid_t r, e, s;
    T(getresuid(&r, &e, &s));
    printf("resuid matches: %d\n", r == getuid() && e == geteuid());
    T(getresgid(&r, &e, &s));
    gid_t gs[256];
    int n = getgroups(256, gs);
    printf("getgroups: %d\n", n >= 0 && n == getgroups(0, NULL));
    printf("uid16 %ld gid16 %ld\n", syscall(24) == (long)(getuid() & 0xffff),
           syscall(47) == (long)(getgid() & 0xffff));
    struct sched_param sp;
    T(sched_getscheduler(0));
    T(sched_getparam(0, &sp));
    T(sched_get_priority_max(SCHED_FIFO));
    T(sched_get_priority_min(SCHED_RR));
    cpu_set_t cs;
    CPU_ZERO(&cs);
    sched_getaffinity(0, sizeof cs, &cs);
    T(sched_setaffinity(0, sizeof cs, &cs));
    struct timespec ts;
    T(clock_getres(CLOCK_MONOTONIC, &ts));
    T(personality(0xffffffff));
    T(sched_getcpu() >= 0);
    T(syscall(SYS_ioprio_get, 1, 0) >= 0);
    char *pg = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pg[0] = 1;
    unsigned char vec[2];
    T(mincore(pg, 8192, vec));
    printf("resident: %d\n", vec[0] & 1);
    T(msync(pg, 4096, MS_SYNC));
    T(mlock(pg, 100));
    T(munlock(pg, 100));
    T(munmap(pg + 4096, 4096));
    T(msync(pg, 8192, MS_SYNC));
    int hi = dup2(0, 60);
    T(close_range(hi, hi + 5, 0));
    T(fcntl(hi, F_GETFD));
}

static void events(void) {
    int p[2];
    pipe(p);
    write(p[1], "z", 1);
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(p[0], &rs);
    struct timeval tv = {0, 1000};
    T(select(p[0] + 1, &rs, 0, 0, &tv));
    FD_ZERO(&rs);
    FD_SET(p[0], &rs);
    struct timespec ts = {0, 1000};
    T(pselect(p[0] + 1, &rs, 0, 0, &ts, 0));
    struct pollfd pf = {p[0], POLLIN, 0};
    T(ppoll(&pf, 1, &ts, 0));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 0x1122334455667788ULL};
    T(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e));
    struct epoll_event o = {0};
    T(epoll_wait(ep, &o, 1, 1000));
    printf("epoll data %llx events %x\n", (unsigned long long)o.data.u64, o.events);
    T(epoll_ctl(ep, EPOLL_CTL_DEL, p[0], NULL));
    T(epoll_pwait(ep, &o, 1, 0, 0));
    int tf = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    struct itimerspec it = {{0, 0}, {0, 20000000}}, cur;
    T(timerfd_settime(tf, 0, &it, 0));
    T(timerfd_gettime(tf, &cur));
    printf("armed: %d\n", cur.it_value.tv_sec == 0 && cur.it_value.tv_nsec > 0);
    unsigned long long v = 0;
    T(read(tf, &v, 8));
    printf("expirations: %llu\n", v);
    int ev = eventfd(3, EFD_SEMAPHORE);
    T(read(ev, &v, 8));
    printf("semaphore: %llu\n", v);
    v = 5;
    T(write(ev, &v, 8));
    int in = inotify_init1(IN_CLOEXEC);
    T(inotify_add_watch(in, dir, IN_CREATE) > 0);
    close(open(in_dir("watched"), O_CREAT | O_WRONLY, 0644));
    char ib[256];
    long n = read(in, ib, sizeof ib);
    struct inotify_event *ie = (void *)ib;
    printf("inotify: %d mask %x name %s\n", n > 0, ie->mask, ie->name);
    unlink(in_dir("watched"));
}

static void sockets(void) {
    /* A socketpair, and a pipe's read end passed over it. */
    int sv[2];
    T(socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
    int p[2];
    pipe(p);
    write(p[1], "through the passed fd", 21);
    close(p[1]);
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec io = {"x", 1};
    struct msghdr m = {0};
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &p[0], sizeof(int));
    T(sendmsg(sv[0], &m, 0));
    close(p[0]);
    char rb[8], rc[CMSG_SPACE(sizeof(int))];
    struct iovec ri = {rb, 8};
    struct msghdr rm = {0};
    rm.msg_iov = &ri;
    rm.msg_iovlen = 1;
    rm.msg_control = rc;
    rm.msg_controllen = sizeof rc;
    T(recvmsg(sv[1], &rm, MSG_CMSG_CLOEXEC));
    struct cmsghdr *rcm = CMSG_FIRSTHDR(&rm);
    if (rcm && rcm->cmsg_type == SCM_RIGHTS) {
        int got;
        memcpy(&got, CMSG_DATA(rcm), sizeof got);
        char t[32] = {0};
        T(read(got, t, 31));
        printf("read: %s; controllen %u, flags %x, cloexec %d\n", t, (unsigned)rm.msg_controllen,
               rm.msg_flags, fcntl(got, F_GETFD));
    }
    T(shutdown(sv[0], SHUT_WR));
    T(read(sv[1], rb, 8));
    T(send(sv[1], "x", 1, MSG_NOSIGNAL));
    close(sv[0]);
    T(send(sv[1], "x", 1, MSG_NOSIGNAL));

    /* A Unix stream server and a child that connects. */
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", in_dir("sock"));
    T(bind(s, (void *)&a, sizeof a));
    T(listen(s, 1));
    if (fork() == 0) {
        int k = socket(AF_UNIX, SOCK_STREAM, 0);
        connect(k, (void *)&a, sizeof a);
        write(k, "hi!", 3);
        _exit(0);
    }
    struct sockaddr_un peer;
    socklen_t pl = sizeof peer;
    int k = accept(s, (void *)&peer, &pl);
    memset(rb, 0, sizeof rb);
    T(read(k, rb, 3));
    printf("accepted: %s (address length %d)\n", rb, (int)pl);
    wait(0);
    unlink(a.sun_path);

    /* Loopback TCP, a port the kernel picks. */
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int one = 1;
    T(setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one));
    T(bind(ls, (void *)&in, sizeof in));
    socklen_t il = sizeof in;
    T(getsockname(ls, (void *)&in, &il));
    T(listen(ls, 4));
    int cl = socket(AF_INET, SOCK_STREAM, 0);
    T(connect(cl, (void *)&in, sizeof in));
    int sc = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    printf("accept4: %d cloexec %d\n", sc >= 0, fcntl(sc, F_GETFD));
    struct sockaddr_in pa;
    socklen_t pal = sizeof pa;
    T(getpeername(sc, (void *)&pa, &pal));
    printf("peer: %s\n", inet_ntoa(pa.sin_addr));
    T(send(cl, "over tcp", 8, 0));
    memset(rb, 0, sizeof rb);
    T(recv(sc, rb, 8, MSG_WAITALL));
    printf("tcp: %.8s\n", rb);
    int v = 0;
    socklen_t vl = sizeof v;
    T(getsockopt(sc, SOL_SOCKET, SO_TYPE, &v, &vl));
    printf("type %d len %d\n", v, (int)vl);

    /* UDP, sendmmsg and recvmmsg, a receive timeout. */
    int u1 = socket(AF_INET, SOCK_DGRAM, 0), u2 = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    T(bind(u1, (void *)&ua, sizeof ua));
    socklen_t ual = sizeof ua;
    getsockname(u1, (void *)&ua, &ual);
    T(sendto(u2, "datagram", 8, 0, (void *)&ua, sizeof ua));
    char ub[16] = {0};
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    T(recvfrom(u1, ub, 16, 0, (void *)&from, &fl));
    printf("udp: %s from %s\n", ub, inet_ntoa(from.sin_addr));
    struct mmsghdr mm[2];
    struct iovec mi[2] = {{"one", 3}, {"two", 3}};
    memset(mm, 0, sizeof mm);
    for (int i = 0; i < 2; i++) {
        mm[i].msg_hdr.msg_iov = &mi[i];
        mm[i].msg_hdr.msg_iovlen = 1;
        mm[i].msg_hdr.msg_name = &ua;
        mm[i].msg_hdr.msg_namelen = sizeof ua;
    }
    T(sendmmsg(u2, mm, 2, 0));
    printf("sent %u %u\n", mm[0].msg_len, mm[1].msg_len);
    struct mmsghdr rmm[2];
    char b0[8] = {0}, b1[8] = {0};
    struct iovec rio[2] = {{b0, 8}, {b1, 8}};
    memset(rmm, 0, sizeof rmm);
    for (int i = 0; i < 2; i++) {
        rmm[i].msg_hdr.msg_iov = &rio[i];
        rmm[i].msg_hdr.msg_iovlen = 1;
    }
    T(recvmmsg(u1, rmm, 2, 0, NULL));
    printf("received %s %s (%u %u)\n", b0, b1, rmm[0].msg_len, rmm[1].msg_len);
    struct timeval tv = {1, 500000}, tv2 = {0, 0};
    T(setsockopt(u1, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
    socklen_t tl = sizeof tv2;
    T(getsockopt(u1, SOL_SOCKET, SO_RCVTIMEO, &tv2, &tl));
    printf("timeout %ld.%06ld (%d bytes)\n", (long)tv2.tv_sec, (long)tv2.tv_usec, (int)tl);
    struct timeval brief = {0, 50000};
    setsockopt(u1, SOL_SOCKET, SO_RCVTIMEO, &brief, sizeof brief);
    T(recv(u1, ub, 16, 0));

    /* The direct system calls (glibc uses socketcall). */
    int dp[2];
    T(syscall(360, AF_UNIX, SOCK_DGRAM, 0, dp));
    T(syscall(369, dp[0], "direct", 6, 0, 0, 0));
    char db[8] = {0};
    T(syscall(371, dp[1], db, 8, 0, 0, 0));
    printf("direct: %s\n", db);
    T(syscall(359, AF_INET, SOCK_STREAM, 0) >= 0);
    T(syscall(102, 99, NULL));
}

static volatile sig_atomic_t ticks;
static void on_tick(int s) {
    (void)s;
    ticks++;
}

static void posix_timers(void) {
    signal(SIGUSR1, on_tick);
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = SIGUSR1;
    timer_t t;
    T(timer_create(CLOCK_MONOTONIC, &sev, &t));
    struct itimerspec it = {{0, 10000000}, {0, 10000000}}, cur;
    T(timer_settime(t, 0, &it, 0));
    while (ticks < 3)
        pause();
    T(timer_gettime(t, &cur));
    printf("interval %ld ns, ticked %d\n", cur.it_interval.tv_nsec, ticks >= 3);
    T(timer_getoverrun(t) >= 0);
    T(timer_delete(t));
    T(timer_delete(t));
    sev.sigev_notify = SIGEV_NONE;
    T(timer_create(CLOCK_REALTIME, &sev, &t));
    struct itimerspec later = {{0, 0}, {100, 0}};
    T(timer_settime(t, 0, &later, 0));
    T(timer_gettime(t, &cur));
    printf("armed for later: %d\n", cur.it_value.tv_sec > 90);
    T(timer_delete(t));
}

static volatile int queued_value = -1, queued_code;
static void on_queued(int s, siginfo_t *si, void *u) {
    (void)s;
    (void)u;
    queued_value = si->si_value.sival_int;
    queued_code = si->si_code;
}

static void queued_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_queued;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGRTMIN + 1, &sa, 0);
    union sigval v = {.sival_int = 4242};
    T(sigqueue(getpid(), SIGRTMIN + 1, v));
    printf("handler: value %d, SI_QUEUE %d\n", queued_value, queued_code == SI_QUEUE);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigprocmask(SIG_BLOCK, &m, 0);
    v.sival_int = 7;
    T(sigqueue(getpid(), SIGUSR1, v));
    siginfo_t si;
    T(sigwaitinfo(&m, &si));
    printf("sigwaitinfo: value %d, SI_QUEUE %d\n", si.si_value.sival_int, si.si_code == SI_QUEUE);
    T(kill(getpid(), SIGUSR1));
    T(sigwaitinfo(&m, &si));
    printf("sigwaitinfo: SI_USER %d, from itself %d\n", si.si_code == SI_USER, si.si_pid == getpid());
}

struct message {
    long type;
    char text[32];
};
union semun {
    int val;
    unsigned short *array;
};

static void sysv_ipc(void) {
    int q = msgget(IPC_PRIVATE, 0600);
    printf("msgget: %d\n", q >= 0);
    struct message m = {2, "second"};
    T(msgsnd(q, &m, 7, 0));
    m.type = 1;
    strcpy(m.text, "first");
    T(msgsnd(q, &m, 6, 0));
    struct message r;
    memset(&r, 0, sizeof r);
    T(msgrcv(q, &r, sizeof r.text, 1, 0));
    printf("type %ld: %s\n", r.type, r.text);
    fflush(stdout);
    if (fork() == 0) {
        struct message c;
        memset(&c, 0, sizeof c);
        long n = msgrcv(q, &c, sizeof c.text, 0, 0);
        printf("child: %ld bytes, type %ld: %s\n", n, c.type, c.text);
        fflush(stdout);
        _exit(0);
    }
    wait(0);
    T(msgrcv(q, &r, sizeof r.text, 0, IPC_NOWAIT));
    T(msgctl(q, IPC_RMID, 0));
    int s = semget(IPC_PRIVATE, 2, 0600);
    printf("semget: %d\n", s >= 0);
    union semun u;
    u.val = 3;
    T(semctl(s, 0, SETVAL, u));
    T(semctl(s, 0, GETVAL));
    unsigned short all[2] = {5, 6}, got[2] = {0, 0};
    u.array = all;
    T(semctl(s, 0, SETALL, u));
    u.array = got;
    T(semctl(s, 0, GETALL, u));
    printf("values %d %d\n", got[0], got[1]);
    struct sembuf op = {1, -2, 0};
    T(semop(s, &op, 1));
    T(semctl(s, 1, GETVAL));
    struct sembuf wait_op = {0, -9, 0};
    struct timespec ts = {0, 10000000};
    T(semtimedop(s, &wait_op, 1, &ts));
    T(semctl(s, 1, GETPID) == getpid());
    T(semctl(s, 0, IPC_RMID));
    /* A shared memory segment, attached before a fork and again in the
     * child. */
    int id = shmget(IPC_PRIVATE, 10000, IPC_CREAT | 0600);
    printf("shmget: %d\n", id >= 0);
    char *p = shmat(id, 0, 0);
    printf("shmat: %d\n", p != (void *)-1);
    strcpy(p, "parent");
    fflush(stdout);
    if (fork() == 0) {
        printf("child sees %s\n", p);
        strcpy(p + 5000, "child wrote");
        char *again = shmat(id, 0, SHM_RDONLY);
        printf("child's second attachment sees %s\n", again + 5000);
        shmdt(again);
        fflush(stdout);
        _exit(0);
    }
    wait(0);
    printf("parent sees %s\n", p + 5000);
    struct shmid_ds ds;
    T(shmctl(id, IPC_STAT, &ds));
    printf("segment size %u\n", (unsigned)ds.shm_segsz);
    T(shmdt(p));
    T(shmdt(p));
    T(shmctl(id, IPC_RMID, 0));
    T(shmat(id, 0, 0) == (void *)-1);
    /* (One an earlier run left behind goes first.) */
    shmctl(shmget(0x5eedf00d, 0, 0), IPC_RMID, 0);
    int k = shmget(0x5eedf00d, 4096, IPC_CREAT | IPC_EXCL | 0600);
    printf("keyed: %d\n", k >= 0 && shmget(0x5eedf00d, 4096, 0) == k);
    T(shmget(0x5eedf00d, 4096, IPC_CREAT | IPC_EXCL | 0600));
    T(shmctl(k, IPC_RMID, 0));
}

static void more_calls(void) {
    /* A signal the process blocks, read from a signalfd. */
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m, 0);
    int sf = signalfd(-1, &m, SFD_CLOEXEC);
    kill(getpid(), SIGUSR2);
    struct signalfd_siginfo si;
    T(read(sf, &si, sizeof si));
    printf("signalfd: signal %u from itself %d\n", si.ssi_signo, si.ssi_pid == (unsigned)getpid());
    /* splice and tee through pipes. */
    int p[2], p2[2];
    pipe(p);
    pipe(p2);
    write(p[1], "splice me", 9);
    int fd = open(in_dir("spliced"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    loff_t off = 3;
    T(splice(p[0], NULL, fd, &off, 9, 0));
    char b[16] = {0};
    pread(fd, b + 3, 9, 3);
    printf("spliced to offset 3, now %lld: %s\n", (long long)off, b + 3);
    write(p[1], "tee", 3);
    T(tee(p[0], p2[1], 3, 0));
    memset(b, 0, sizeof b);
    read(p2[0], b, 3);
    printf("tee: %s\n", b);
    /* Old time calls, extended attributes, nice. */
    struct utimbuf ub = {1000000000, 1000000001};
    T(utime(in_dir("spliced"), &ub));
    struct stat st;
    stat(in_dir("spliced"), &st);
    printf("mtime %ld\n", (long)st.st_mtime);
    struct timeval tv[2] = {{5, 0}, {6, 0}};
    T(futimesat(AT_FDCWD, in_dir("spliced"), tv));
    stat(in_dir("spliced"), &st);
    printf("mtime %ld\n", (long)st.st_mtime);
    T(setxattr(in_dir("spliced"), "user.popek", "val", 3, 0));
    char xv[16] = {0};
    T(getxattr(in_dir("spliced"), "user.popek", xv, sizeof xv));
    T(fgetxattr(fd, "user.popek", NULL, 0));
    char list[64] = {0};
    T(listxattr(in_dir("spliced"), list, sizeof list));
    printf("xattr %s, list %s\n", xv, list);
    T(removexattr(in_dir("spliced"), "user.popek"));
    T(lgetxattr(in_dir("spliced"), "user.popek", xv, sizeof xv));
    T(nice(0));
    close(fd);
}

static void shared_memory(void) {
    /* Shared anonymous memory is shared with a forked child. */
    volatile int *sh = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int go[2], back[2];
    pipe(go);
    pipe(back);
    sh[0] = 1;
    sh[1024] = 5;
    if (fork() == 0) {
        char c;
        for (int i = 0; i < 3; i++) {
            read(go[0], &c, 1);
            sh[0] += 10;
            write(back[1], "k", 1);
        }
        sh[1024] = 99;
        _exit(0);
    }
    char c;
    for (int i = 0; i < 3; i++) {
        sh[0] += 1;
        write(go[1], "g", 1);
        read(back[0], &c, 1);
    }
    wait(0);
    printf("shared counter %d, second page %d\n", sh[0], sh[1024]);
    /* A file mapped shared: stores reach the file and the file's writes
     * reach the mapping, without msync; two mappings of one page agree. */
    int fd = open(in_dir("shared"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ftruncate(fd, 8192);
    char *m = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *m2 = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 4096);
    printf("mapped: %d %d\n", m != MAP_FAILED, m2 != MAP_FAILED);
    strcpy(m, "stored through the mapping");
    strcpy(m + 4096, "second page");
    char b[40] = {0};
    T(pread(fd, b, 39, 0));
    printf("file: %s; other mapping: %s\n", b, m2);
    T(pwrite(fd, "PWRITE", 6, 0));
    printf("mapping: %.26s\n", m);
    if (fork() == 0) {
        strcpy(m + 100, "from the child");
        _exit(0);
    }
    wait(0);
    printf("child's store: %s\n", m + 100);
    T(msync(m, 8192, MS_SYNC));
    T(munmap(m, 8192));
    char *fresh = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fresh[0] = 'z';
    memset(b, 0, sizeof b);
    T(pread(fd, b, 6, 0));
    printf("file after unmapping and reusing memory: %s, fresh page %d\n", b, fresh[1]);
    /* A private mapping is a copy. */
    char *pv = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    pv[0] = 'p';
    memset(b, 0, sizeof b);
    T(pread(fd, b, 1, 0));
    printf("private store leaves the file: %s\n", b);
    close(fd);
    printf("other mapping still: %s\n", m2);
    /* Futexes in shared memory wake waiters in other processes: a POSIX
     * shared-memory object and named semaphore, an unnamed semaphore in
     * shared anonymous memory, a process-shared mutex. */
    int sfd = shm_open("/popek-syscalls-test", O_CREAT | O_RDWR, 0600);
    ftruncate(sfd, 4096);
    char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    shm_unlink("/popek-syscalls-test");
    sem_t *named = sem_open("/popek-syscalls-sem", O_CREAT, 0600, 0);
    sem_unlink("/popek-syscalls-sem");
    sem_t *unnamed = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    sem_init(unnamed, 1, 0);
    fflush(stdout);
    if (fork() == 0) {
        usleep(50000);
        strcpy(p, "posix shared memory");
        sem_post(named);
        usleep(50000);
        sem_post(unnamed);
        _exit(0);
    }
    T(sem_wait(named));
    printf("after the child's post: %s\n", p);
    T(sem_wait(unnamed));
    wait(0);
    pthread_mutex_t *mu = (void *)(p + 1024);
    pthread_mutexattr_t at;
    pthread_mutexattr_init(&at);
    pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
    pthread_mutex_init(mu, &at);
    pthread_mutex_lock(mu);
    strcpy(p + 2048, "parent");
    if (fork() == 0) {
        pthread_mutex_lock(mu);
        printf("the child holds the mutex after the %s\n", p + 2048);
        fflush(stdout);
        pthread_mutex_unlock(mu);
        _exit(0);
    }
    usleep(50000);
    strcpy(p + 2048, "parent let go");
    pthread_mutex_unlock(mu);
    wait(0);
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    snprintf(dir, sizeof dir, "%s", argv[1]);
    signal(SIGPIPE, SIG_IGN);
    positioned_io();
    paths_and_ids();
    events();
    sockets();
    more_calls();
    posix_timers();
    queued_signals();
    sysv_ipc();
    shared_memory();
    return 0;
}
