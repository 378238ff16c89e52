/* glibc under popek: printf, qsort, malloc/free, file I/O, strings,
 * setjmp/longjmp, environment and arguments. Output must equal native. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fcntl.h>
#include <dirent.h>
#include <sys/sendfile.h>

static jmp_buf jb;
static int depth;
static int by_value(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }
static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
static void dive(int n) { if (n == 0) longjmp(jb, 42); depth++; dive(n - 1); }

int main(int argc, char **argv) {
    printf("argc=%d argv1=%s\n", argc, argc > 1 ? argv[1] : "-");
    printf("ints: %d %u %x %o %ld %lld %+05d %-6d| %hhd %zu\n", -42, 42u, 0xbeef, 8, -1L,
           -1234567890123LL, 7, 3, (char)300, sizeof(long double));
    printf("floats: %f %.3e %g %g %.10f %a %Lf\n", 3.14159, 6.02e23, 1e-5, 123456789.0,
           1.0 / 3, 0.1, (long double)2 / 3);
    int v[200];
    for (int i = 0; i < 200; i++) v[i] = (i * 7919 + 13) % 1009;
    qsort(v, 200, sizeof v[0], by_value);
    printf("qsort: %d %d %d %d\n", v[0], v[1], v[100], v[199]);
    char *names[] = {"pear", "apple", "fig", "banana", "cherry"};
    qsort(names, 5, sizeof names[0], by_name);
    printf("names: %s %s %s %s %s\n", names[0], names[1], names[2], names[3], names[4]);

    /* malloc and free: small (brk) and large (mmap) blocks, realloc growth */
    char *blocks[64];
    size_t total = 0;
    for (int i = 0; i < 64; i++) {
        size_t n = (i % 8 == 7) ? (size_t)(256 << 10) + i : (size_t)(i * 37 + 1);
        blocks[i] = malloc(n);
        memset(blocks[i], 'a' + i % 26, n);
        total += n;
    }
    for (int i = 0; i < 64; i += 2) free(blocks[i]);
    char *r = malloc(16);
    for (int i = 1; i <= 20; i++) { r = realloc(r, (size_t)1 << i); r[((size_t)1 << i) - 1] = (char)i; }
    printf("malloc: total=%zu b1=%c b63=%c realloc=%d\n", total, blocks[1][0], blocks[63][5], r[(1 << 20) - 1]);
    free(r);
    for (int i = 1; i < 64; i += 2) free(blocks[i]);

    /* files */
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    char path[512];
    snprintf(path, sizeof path, "%s/popek-libc-test.txt", dir);
    FILE *f = fopen(path, "w");
    if (!f) { perror("fopen"); return 1; }
    for (int i = 0; i < 1000; i++) fprintf(f, "line %d %s\n", i, i % 2 ? "odd" : "even");
    fclose(f);
    struct stat st;
    stat(path, &st);
    printf("file: size=%lld mode=%o\n", (long long)st.st_size, st.st_mode & 0777);
    f = fopen(path, "r");
    char line[64];
    int lines = 0;
    long sum = 0;
    while (fgets(line, sizeof line, f)) { lines++; sum += strlen(line); }
    fseek(f, 10, SEEK_SET);
    int c = fgetc(f);
    printf("read: lines=%d bytes=%ld at10=%c tell=%ld\n", lines, sum, c, ftell(f));
    fclose(f);
    int fd = open(path, O_RDONLY);
    char buf[16] = {0};
    lseek(fd, -9, SEEK_END);
    read(fd, buf, 8);
    printf("tail: %s\n", buf);
    /* sendfile from an offset straight to stdout; the offset advances */
    fflush(stdout);
    off_t off = 3;
    ssize_t sent = sendfile(1, fd, &off, 12);
    printf("\nsendfile: %zd off=%lld\n", sent, (long long)off);
    close(fd);
    printf("access: %d %d\n", access(path, R_OK), access("/nonexistent/x", F_OK));
    unlink(path);
    printf("after unlink: %d\n", access(path, F_OK));

    /* strings */
    char s[128] = "The quick brown fox";
    strcat(s, " jumps over the lazy dog");
    printf("strings: len=%zu chr=%s rchr=%s str=%s cmp=%d ncmp=%d\n", strlen(s), strchr(s, 'q'),
           strrchr(s, 'o'), strstr(s, "lazy"), strcmp("abc", "abd") < 0, strncmp(s, "The", 3));
    char copy[128];
    memcpy(copy, s, strlen(s) + 1);
    memmove(copy + 4, copy, 10);
    printf("memmove: %s spn=%zu tok=%s dup=%s\n", copy, strspn(s, "Teh "), strtok(copy, " "),
           strdup("duplicate"));
    printf("conv: %ld %lu %g %d\n", strtol("-0x7f", 0, 16), strtoul("777", 0, 8), atof("2.5e-3"),
           atoi("  123abc"));

    /* setjmp/longjmp out of a recursion */
    int got = setjmp(jb);
    if (got == 0) dive(100);
    printf("longjmp: %d depth=%d\n", got, depth);
    printf("env: %s\n", getenv("POPEK_TEST_VAR") ? getenv("POPEK_TEST_VAR") : "(unset)");
    fflush(stdout);
    fprintf(stderr, "done\n");
    return 17;
}
