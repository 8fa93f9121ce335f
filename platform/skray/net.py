"""Network defaults shared by every server skray starts (Serve, the embedded S3 server and Ray
head)."""

# Bind here unless told otherwise: nothing is reachable from other machines by default.
LOOPBACK = "127.0.0.1"
