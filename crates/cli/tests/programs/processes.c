/* processes: fork, pipes, exec (of an i386 program and of a host one),
 * wait statuses, signal handlers (kill to self, the blocked mask, SIGCHLD,
 * alarm and pause), children killed by signals (SIGTERM, SIGSEGV,
 * SIGPIPE's default action), synchronous faults delivered to handlers
 * with si_addr, a stack overflow on sigaltstack, system() and popen(),
 * process groups. Its output under popek must equal its
 * output run directly (crates/cli/tests/processes.rs). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <sys/time.h>
#include <setjmp.h>

static volatile sig_atomic_t got_usr1, got_alrm, got_chld;
static void on_usr1(int s) { got_usr1 = s; }
static void on_alrm(int s) { got_alrm = s; }
static void on_chld(int s) { got_chld++; (void)s; }
static sigjmp_buf jb;
static volatile void *fault_addr;
static void on_segv(int s, siginfo_t *si, void *uc) { (void)s; (void)uc; fault_addr = si->si_addr; siglongjmp(jb, 1); }
static void on_fpe(int s) { (void)s; siglongjmp(jb, 2); }
static char *alt;
static volatile int on_alt, depth;
static void on_overflow(int s) { char x; (void)s; on_alt = &x >= alt && &x < alt + 65536; siglongjmp(jb, 3); }
static int recurse(int n) { volatile char pad[1024]; pad[0] = (char)n; depth++; return recurse(n + 1) + pad[0]; }

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "child")) { printf("exec'd child %s\n", argv[2]); return 5; }
    setvbuf(stdout, NULL, _IONBF, 0);
    /* fork + wait */
    pid_t p = fork();
    if (p == 0) { printf("child says hi\n"); _exit(3); }
    int st; waitpid(p, &st, 0);
    printf("child exited %d %d\n", WIFEXITED(st), WEXITSTATUS(st));
    /* pipe between processes */
    int fd[2]; pipe(fd);
    if ((p = fork()) == 0) { close(fd[0]); dup2(fd[1], 1); close(fd[1]); printf("through the pipe\n"); fflush(stdout); _exit(0); }
    close(fd[1]); char buf[64] = {0}; ssize_t n = 0, k; while ((k = read(fd[0], buf + n, sizeof buf - 1 - n)) > 0) n += k; close(fd[0]);
    waitpid(p, &st, 0); printf("read %zd: %s", n, buf);
    /* exec an i386 program (ourselves) */
    if ((p = fork()) == 0) { execl("/proc/self/exe", argv[0], "child", "arg", (char *)0); _exit(99); }
    waitpid(p, &st, 0); printf("exec status %d\n", WEXITSTATUS(st));
    /* exec a host program */
    if ((p = fork()) == 0) { execl("/bin/echo", "echo", "host echo", (char *)0); _exit(99); }
    waitpid(p, &st, 0); printf("host exec status %d\n", WEXITSTATUS(st));
    /* signals: handler, kill to self, mask, SIGCHLD */
    signal(SIGUSR1, on_usr1);
    kill(getpid(), SIGUSR1);
    printf("usr1 handled %d\n", got_usr1);
    sigset_t m, old; sigemptyset(&m); sigaddset(&m, SIGUSR1); sigprocmask(SIG_BLOCK, &m, &old);
    got_usr1 = 0; kill(getpid(), SIGUSR1); printf("blocked: %d\n", got_usr1);
    sigprocmask(SIG_SETMASK, &old, NULL); printf("unblocked: %d\n", got_usr1);
    struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_handler = on_chld; sigaction(SIGCHLD, &sa, NULL);
    if ((p = fork()) == 0) _exit(0);
    while (waitpid(p, &st, 0) < 0 && errno == EINTR) {}
    printf("sigchld seen %d\n", got_chld > 0);
    /* alarm + pause */
    signal(SIGALRM, on_alrm); alarm(1); pause(); printf("alarm %d\n", got_alrm);
    /* child killed by a signal */
    if ((p = fork()) == 0) { raise(SIGTERM); _exit(0); }
    waitpid(p, &st, 0); printf("signaled %d sig %d\n", WIFSIGNALED(st), WTERMSIG(st));
    if ((p = fork()) == 0) { *(volatile int *)8 = 1; _exit(0); }
    waitpid(p, &st, 0); printf("segv child: signaled %d sig %d\n", WIFSIGNALED(st), WTERMSIG(st));
    /* synchronous faults to handlers */
    struct sigaction sv; memset(&sv, 0, sizeof sv); sv.sa_sigaction = on_segv; sv.sa_flags = SA_SIGINFO; sigaction(SIGSEGV, &sv, NULL);
    if (sigsetjmp(jb, 1) == 0) { *(volatile int *)0x1234 = 1; }
    printf("segv handled, si_addr %p\n", (void *)fault_addr);
    signal(SIGFPE, on_fpe);
    int r = sigsetjmp(jb, 1);
    if (r == 0) { unsigned q; __asm__ volatile("divl %2" : "=a"(q) : "a"(1), "r"(0), "d"(0)); printf("%u\n", q); }
    printf("fpe handled %d\n", r);
    /* waitid */
    if ((p = fork()) == 0) _exit(9);
    siginfo_t wi; memset(&wi, 0, sizeof wi);
    waitid(P_PID, p, &wi, WEXITED);
    printf("waitid: pid ok %d code %d status %d\n", wi.si_pid == p, wi.si_code, wi.si_status);
    /* a sleep that a signal ends early */
    signal(SIGUSR1, on_usr1); got_usr1 = 0;
    pid_t pk = fork();
    if (pk == 0) { for (int i = 0; i < 50; i++) { usleep(100000); kill(getppid(), SIGUSR1); } _exit(0); }
    int left = sleep(5);
    kill(pk, SIGKILL); waitpid(pk, &st, 0);
    printf("sleep interrupted: %d, usr1 %d\n", left > 0, got_usr1);
    /* SIGPIPE default kills the writer */
    int q[2]; pipe(q);
    if ((p = fork()) == 0) { close(q[0]); sleep(1); for (;;) write(q[1], "x", 1); }
    close(q[0]); close(q[1]); waitpid(p, &st, 0); printf("sigpipe: %d %d\n", WIFSIGNALED(st), WTERMSIG(st));
    /* sigpending, sigwait, sigtimedwait on a blocked signal */
    sigset_t w; sigemptyset(&w); sigaddset(&w, SIGUSR2); sigprocmask(SIG_BLOCK, &w, NULL);
    kill(getpid(), SIGUSR2);
    sigset_t pend; sigemptyset(&pend); sigpending(&pend);
    printf("pending usr2 %d\n", sigismember(&pend, SIGUSR2));
    int got = 0; sigwait(&w, &got); printf("sigwait %d\n", got);
    struct timespec tw = {0, 10000000};
    int tr = sigtimedwait(&w, NULL, &tw); printf("timedwait %d errno %d\n", tr, tr < 0 ? errno : 0);
    /* a stack overflow caught on the alternate signal stack */
    alt = malloc(65536);
    stack_t ss = { .ss_sp = alt, .ss_size = 65536, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    struct sigaction so; memset(&so, 0, sizeof so); so.sa_handler = on_overflow; so.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &so, NULL);
    if (sigsetjmp(jb, 1) == 0) recurse(0);
    stack_t os; sigaltstack(NULL, &os);
    printf("overflow on the alternate stack: %d, deep: %d, size %zu\n", on_alt, depth > 1000, os.ss_size);
    /* system, popen (posix_spawn: clone3 or clone with CLONE_VM|CLONE_VFORK) */
    int rs = system("echo from system; exit 4");
    printf("system: %d\n", WEXITSTATUS(rs));
    FILE *pf = popen("echo popen line", "r");
    char pl[64] = {0};
    if (pf && fgets(pl, sizeof pl, pf)) printf("popen: %s", pl);
    printf("pclose %d\n", pf ? pclose(pf) : -1);
    /* process groups */
    printf("pgid==pid after setpgid: %d\n", setpgid(0, 0) == 0 && getpgrp() == getpid());
    return 0;
}
