/* threads: pthreads under popek, compared with direct execution
 * (crates/cli/tests/processes.rs): mutex and condition variable
 * contention, thread-local storage, join values, a thread blocked
 * reading a pipe another thread writes, sleeps, a signal sent to one
 * thread (pthread_kill), fork from a thread, and code one thread writes
 * while another runs it (a JIT's pattern: the second thread must run
 * the new code), and blocking calls (accept, recv, poll, select,
 * epoll_wait, recvmsg) that another thread's work ends. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <poll.h>
#include <sys/select.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/mman.h>
#include <sys/wait.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long counter;
static int ready;
static __thread int tls_v;

static void *work(void *arg)
{
    long id = (long)arg;
    tls_v = (int)id * 10;
    for (int i = 0; i < 20000; i++) {
        pthread_mutex_lock(&mu);
        counter++;
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    ready++;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    return (void *)(long)(tls_v + 1);
}

static int pipefd[2];
static void *reader(void *arg)
{
    (void)arg;
    char buf[32] = {0};
    ssize_t n = read(pipefd[0], buf, sizeof buf - 1);
    return (void *)(long)(n > 0 && !strcmp(buf, "through a pipe"));
}

static volatile sig_atomic_t usr1_in;
static void on_usr1(int s) { (void)s; usr1_in = 1; }
static void *sleeper(void *arg)
{
    (void)arg;
    while (!usr1_in)
        usleep(1000);
    return (void *)(long)usr1_in;
}

static void *forker(void *arg)
{
    (void)arg;
    pid_t p = fork();
    if (p == 0)
        _exit(6);
    int st;
    waitpid(p, &st, 0);
    return (void *)(long)WEXITSTATUS(st);
}

static unsigned char *code;
static int stage;
static void *runner(void *arg)
{
    (void)arg;
    int (*f)(void) = (int (*)(void))code;
    int a = f();
    pthread_mutex_lock(&mu);
    stage = 1;
    pthread_cond_broadcast(&cv);
    while (stage != 2)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    int b = f();
    return (void *)(long)(a * 10 + b);
}

/* A client thread for the main thread's loopback server, a thread that
 * wakes the main thread's poll and epoll_wait, one that sends it a
 * message: each blocking call must let the other threads run. */
static struct sockaddr_in server;
static void *client(void *arg)
{
    (void)arg;
    usleep(20000);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (void *)&server, sizeof server);
    usleep(20000);
    send(c, "from a thread", 13, 0);
    char b[8] = {0};
    recv(c, b, 4, MSG_WAITALL);
    close(c);
    return (void *)(long)(strcmp(b, "pong") == 0);
}

static int wake[2];
static void *waker(void *arg)
{
    (void)arg;
    usleep(20000);
    write(wake[1], "w", 1);
    return NULL;
}

static int pair[2];
static void *messenger(void *arg)
{
    (void)arg;
    usleep(20000);
    struct iovec io = {"message", 7};
    struct msghdr m = {0};
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    return (void *)(long)sendmsg(pair[0], &m, 0);
}

static void blocking_calls(void)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    server.sin_family = AF_INET;
    server.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(ls, (void *)&server, sizeof server);
    socklen_t l = sizeof server;
    getsockname(ls, (void *)&server, &l);
    listen(ls, 1);
    pthread_t t;
    void *ok;
    pthread_create(&t, NULL, client, NULL);
    int s = accept(ls, NULL, NULL);
    char b[32] = {0};
    long n = recv(s, b, 13, MSG_WAITALL);
    send(s, "pong", 4, 0);
    pthread_join(t, &ok);
    printf("accept and recv while a thread connects: %ld %s, client %ld\n", n, b, (long)ok);
    close(s);
    close(ls);

    pipe(wake);
    pthread_create(&t, NULL, waker, NULL);
    struct pollfd pf = {wake[0], POLLIN, 0};
    printf("poll woken by a thread: %d\n", poll(&pf, 1, 5000));
    pthread_join(t, NULL);
    char c;
    read(wake[0], &c, 1);
    pthread_create(&t, NULL, waker, NULL);
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(wake[0], &rs);
    struct timeval tv = {5, 0};
    int ready = select(wake[0] + 1, &rs, NULL, NULL, &tv);
    printf("select woken by a thread: %d, set %d\n", ready, FD_ISSET(wake[0], &rs) != 0);
    pthread_join(t, NULL);
    read(wake[0], &c, 1);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = wake[0]};
    epoll_ctl(ep, EPOLL_CTL_ADD, wake[0], &e);
    pthread_create(&t, NULL, waker, NULL);
    struct epoll_event o;
    int k = epoll_wait(ep, &o, 1, 5000);
    printf("epoll_wait woken by a thread: %d, its fd %d\n", k, o.data.fd == wake[0]);
    pthread_join(t, NULL);

    socketpair(AF_UNIX, SOCK_STREAM, 0, pair);
    pthread_create(&t, NULL, messenger, NULL);
    char mb[16] = {0};
    struct iovec io = {mb, sizeof mb};
    struct msghdr m = {0};
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    n = recvmsg(pair[1], &m, 0);
    pthread_join(t, &ok);
    printf("recvmsg from a thread: %ld %s (sent %ld)\n", n, mb, (long)ok);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    pthread_t t[4];
    tls_v = 7;
    for (long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, work, (void *)(i + 1));
    pthread_mutex_lock(&mu);
    while (ready < 4)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    long sum = 0;
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        sum += (long)r;
    }
    printf("counter %ld, join values %ld, main's tls %d\n", counter, sum, tls_v);

    pipe(pipefd);
    pthread_t r;
    pthread_create(&r, NULL, reader, NULL);
    usleep(20000);
    write(pipefd[1], "through a pipe", 15);
    void *ok;
    pthread_join(r, &ok);
    printf("reader thread: %ld\n", (long)ok);

    signal(SIGUSR1, on_usr1);
    pthread_t s;
    pthread_create(&s, NULL, sleeper, NULL);
    usleep(10000);
    pthread_kill(s, SIGUSR1);
    pthread_join(s, &ok);
    printf("signalled thread: %ld\n", (long)ok);

    pthread_t f;
    pthread_create(&f, NULL, forker, NULL);
    pthread_join(f, &ok);
    printf("fork from a thread: child status %ld\n", (long)ok);

    /* mov $1, %eax; ret  ->  mov $2, %eax; ret */
    code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char one[] = {0xB8, 1, 0, 0, 0, 0xC3};
    memcpy(code, one, sizeof one);
    pthread_t j;
    pthread_create(&j, NULL, runner, NULL);
    pthread_mutex_lock(&mu);
    while (stage != 1)
        pthread_cond_wait(&cv, &mu);
    code[1] = 2;
    stage = 2;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(j, &ok);
    printf("code written by one thread, run by another: %ld\n", (long)ok);
    blocking_calls();
    return 0;
}
