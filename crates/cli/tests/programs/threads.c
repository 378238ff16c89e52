/* threads: pthreads under popek, compared with direct execution
 * (crates/cli/tests/processes.rs): mutex and condition variable
 * contention, thread-local storage, join values, a thread blocked
 * reading a pipe another thread writes, sleeps, a signal sent to one
 * thread (pthread_kill), fork from a thread, and code one thread writes
 * while another runs it (a JIT's pattern: the second thread must run
 * the new code). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
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
    return 0;
}
