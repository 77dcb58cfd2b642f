/*
 * vsock_probe: the guest side of the vsock tests (built static by
 * tests/src/initramfs.rs into the test initramfs as /bin/vsock_probe).
 *   listen PORT         echo "echo:<line>" once per connection until "quit"
 *   echo PORT           accept one connection and echo every byte back until
 *                       EOF, then print VMPOD-ECHOED=<bytes>
 *   connect CID PORT MSG  send MSG, print the reply line
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int readline(int fd, char *buf, int cap) {
    int n = 0;
    while (n < cap - 1) {
        char c;
        int r = read(fd, &c, 1);
        if (r <= 0) break;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return n;
}

int main(int argc, char **argv) {
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = atoi(argv[2]);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("listen"); return 1; }
        printf("VMPOD-LISTENING %s\n", argv[2]);
        fflush(stdout);
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c < 0) { perror("accept"); return 1; }
            char line[512], out[600];
            readline(c, line, sizeof line);
            int n = snprintf(out, sizeof out, "echo:%s\n", line);
            write(c, out, n);
            close(c);
            if (!strcmp(line, "quit")) return 0;
        }
    }
    if (argc == 3 && !strcmp(argv[1], "echo")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = atoi(argv[2]);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("echo"); return 1; }
        printf("VMPOD-ECHO-LISTENING %s\n", argv[2]);
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        static char buf[65536];
        long total = 0;
        for (;;) {
            int n = read(c, buf, sizeof buf);
            if (n <= 0) break;
            for (int off = 0; off < n;) {
                int w = write(c, buf + off, n - off);
                if (w <= 0) return 1;
                off += w;
            }
            total += n;
        }
        printf("VMPOD-ECHOED=%ld\n", total);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        a.svm_cid = atoi(argv[2]);
        a.svm_port = atoi(argv[3]);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        char msg[512], line[512];
        int n = snprintf(msg, sizeof msg, "%s\n", argv[4]);
        write(s, msg, n);
        readline(s, line, sizeof line);
        printf("%s\n", line);
        return 0;
    }
    fprintf(stderr, "usage: vsock_probe listen PORT | echo PORT | connect CID PORT MSG\n");
    return 2;
}
