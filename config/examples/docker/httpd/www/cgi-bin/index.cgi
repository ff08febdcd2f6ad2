#!/bin/sh
# busybox httpd runs /cgi-bin/index.cgi for "/" when there is no index.html.
printf 'Content-Type: text/plain\r\nX-Instance: %s\r\n\r\n' "$INSTANCE"
echo "${GREETING:-hello} from $INSTANCE"
