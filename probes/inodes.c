/* vmrt-inodes DIR...: for each directory, the entries whose inode number
 * readdir reports (d_ino) differs from what lstat reports (st_ino), one line
 * each ("DIR/NAME d_ino st_ino"), then "DIR: N entries, M differ". "." and
 * ".." are left out (os.scandir leaves them out too). On a mount point the two
 * differ by design in every runtime: readdir sees the directory under the
 * mount, lstat the root of what is mounted there. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 1; i < argc; i++) {
		DIR *d = opendir(argv[i]);
		struct dirent *e;
		int n = 0, differ = 0;

		if (!d) {
			perror(argv[i]);
			return 1;
		}
		while ((e = readdir(d))) {
			struct stat st;

			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
				continue;
			n++;
			if (st.st_ino != e->d_ino) {
				printf("%s/%s %llu %llu\n", strcmp(argv[i], "/") ? argv[i] : "", e->d_name,
				       (unsigned long long)e->d_ino, (unsigned long long)st.st_ino);
				differ++;
			}
		}
		closedir(d);
		printf("%s: %d entries, %d differ\n", argv[i], n, differ);
	}
	return 0;
}
