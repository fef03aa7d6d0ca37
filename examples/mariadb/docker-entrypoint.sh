#!/bin/bash
# The entrypoint of vmrt's MariaDB example (examples/mariadb), after Docker Hub's mariadb image:
# on the first start (no database in /var/lib/mysql) it makes the data directory, sets root's
# password, and creates the database and user the environment names; a data directory already
# set up is used as it is (the variables are then ignored). Then it runs the server (as mysql).
#
#   MARIADB_ROOT_PASSWORD / MYSQL_ROOT_PASSWORD            root's password (root@localhost, root@%)
#   MARIADB_ALLOW_EMPTY_ROOT_PASSWORD / MYSQL_ALLOW_EMPTY_PASSWORD   root without a password
#   MARIADB_RANDOM_ROOT_PASSWORD / MYSQL_RANDOM_ROOT_PASSWORD        a random one, printed once
#   MARIADB_DATABASE / MYSQL_DATABASE                      a database to create
#   MARIADB_USER, MARIADB_PASSWORD / MYSQL_USER, MYSQL_PASSWORD      a user with all rights on it
# Each may be given as NAME_FILE instead (a file holding the value: a secret).
# /docker-entrypoint-initdb.d/*.sql, *.sql.gz and *.sh run once, after the above.
set -eo pipefail
shopt -s nullglob

DATADIR=/var/lib/mysql
SOCKET=/run/mysqld/mysqld.sock
ROOT_CONNECT_PASSWORD=

note() { printf '%s [Entrypoint]: %s\n' "$(date --rfc-3339=seconds)" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# value NAME: $MARIADB_NAME, else $MYSQL_NAME (or the file that ..._FILE names)
value() {
	local n f
	for n in "MARIADB_$1" "MYSQL_$1"; do
		f="${n}_FILE"
		if [ -n "${!n:-}" ] && [ -n "${!f:-}" ]; then
			die "both $n and $f are set (they are exclusive)"
		fi
		if [ -n "${!n:-}" ]; then
			printf '%s' "${!n}"
			return
		fi
		if [ -n "${!f:-}" ]; then
			[ -f "${!f}" ] || die "$f names no file: ${!f}"
			cat -- "${!f}"
			return
		fi
	done
}

# for a string literal in SQL ('...'): backslashes and quotes escaped
sql_string() {
	local s=${1//\\/\\\\}
	printf '%s' "${s//\'/\\\'}"
}

# for an identifier in SQL (`...`): backquotes doubled
sql_name() {
	printf '%s' "${1//\`/\`\`}"
}

sql() {  # the statements on stdin, as root through the temporary server's socket
	MYSQL_PWD=$ROOT_CONNECT_PASSWORD mariadb --protocol=socket --socket="$SOCKET" -uroot \
		--database=mysql --batch --skip-column-names "$@"
}

init_datadir() {
	local root allow_empty random database user password
	root=$(value ROOT_PASSWORD)
	allow_empty=$(value ALLOW_EMPTY_ROOT_PASSWORD)
	[ -n "$allow_empty" ] || allow_empty=$(value ALLOW_EMPTY_PASSWORD)
	random=$(value RANDOM_ROOT_PASSWORD)
	database=$(value DATABASE)
	user=$(value USER)
	password=$(value PASSWORD)
	if [ -z "$root" ] && [ -z "$allow_empty" ] && [ -z "$random" ]; then
		die "database is uninitialized and password option is not specified: set one of" \
			"MARIADB_ROOT_PASSWORD, MARIADB_ALLOW_EMPTY_ROOT_PASSWORD, MARIADB_RANDOM_ROOT_PASSWORD" \
			"(or their MYSQL_ names)"
	fi
	[ "$user" != root ] || die "MARIADB_USER=root: root is set up by MARIADB_ROOT_PASSWORD, not by MARIADB_USER"
	[ -z "$user" ] || [ -n "$password" ] || die "MARIADB_USER is set but MARIADB_PASSWORD is not"
	[ -z "$password" ] || [ -n "$user" ] || die "MARIADB_PASSWORD is set but MARIADB_USER is not"
	if [ -z "$root" ] && [ -n "$random" ]; then
		root=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')
		note "GENERATED ROOT PASSWORD: $root"
	fi

	note "Initializing the database files in $DATADIR"
	mariadb-install-db --datadir="$DATADIR" --rpm --auth-root-authentication-method=normal \
		--skip-test-db --skip-name-resolve --skip-log-bin >/dev/null
	note "Starting a temporary server (no network)"
	"$@" --skip-networking --socket="$SOCKET" --skip-log-bin &
	local pid=$! waited=0
	until mariadb-admin --protocol=socket --socket="$SOCKET" -uroot --connect-timeout=2 ping >/dev/null 2>&1; do
		kill -0 "$pid" 2>/dev/null || die "the temporary server ended while starting"
		[ "$waited" -lt 600 ] || die "the temporary server did not start in 300 seconds"
		waited=$((waited + 1))
		sleep 0.5
	done

	local pw
	pw=$(sql_string "$root")
	{
		echo "SET @@SESSION.SQL_LOG_BIN=0;"
		echo "SET @@SESSION.SQL_MODE=REPLACE(@@SESSION.SQL_MODE, 'NO_BACKSLASH_ESCAPES', '');"
		echo "DROP USER IF EXISTS root@'127.0.0.1', root@'::1';"
		echo "EXECUTE IMMEDIATE CONCAT('DROP USER IF EXISTS root@\\'', @@hostname, '\\'');"
		echo "SET PASSWORD FOR 'root'@'localhost' = PASSWORD('$pw');"
		echo "CREATE USER 'root'@'%' IDENTIFIED BY '$pw';"
		echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
		echo "GRANT PROXY ON ''@'%' TO 'root'@'%' WITH GRANT OPTION;"
		if [ -n "$database" ]; then
			note "Creating database $database" >&2
			echo "CREATE DATABASE IF NOT EXISTS \`$(sql_name "$database")\`;"
		fi
		if [ -n "$user" ]; then
			note "Creating user $user" >&2
			echo "CREATE USER '$(sql_string "$user")'@'%' IDENTIFIED BY '$(sql_string "$password")';"
			if [ -n "$database" ]; then
				echo "GRANT ALL ON \`$(sql_name "$database")\`.* TO '$(sql_string "$user")'@'%';"
			fi
		fi
		echo "FLUSH PRIVILEGES;"
	} | sql
	ROOT_CONNECT_PASSWORD=$root

	local f
	for f in /docker-entrypoint-initdb.d/*; do
		case "$f" in
			*.sh) note "$0: running $f"; . "$f" ;;
			*.sql) note "$0: running $f"; sql ${database:+--database="$database"} <"$f" ;;
			*.sql.gz) note "$0: running $f"; gunzip -c -- "$f" | sql ${database:+--database="$database"} ;;
			*) note "$0: ignoring $f" ;;
		esac
	done

	note "Stopping the temporary server"
	kill -TERM "$pid"
	wait "$pid" || die "the temporary server did not stop cleanly"
	note "The database files are ready"
}

if [ "${1:0:1}" = '-' ]; then  # options only: the server's
	set -- mariadbd "$@"
fi

if [ "$1" = mariadbd ] || [ "$1" = mysqld ]; then
	if [ "$(id -u)" = 0 ]; then  # the directories the server writes are its own, then it runs as mysql
		mkdir -p "$DATADIR" /run/mysqld
		chown mysql:mysql /run/mysqld
		[ "$(stat -c %U "$DATADIR")" = mysql ] || chown -R mysql:mysql "$DATADIR"
		exec setpriv --reuid=mysql --regid=mysql --init-groups -- "$0" "$@"
	fi
	if [ ! -d "$DATADIR/mysql" ]; then
		init_datadir "$@"
	else
		note "$DATADIR is set up already: the environment's passwords and users are not applied"
	fi
fi

exec "$@"
