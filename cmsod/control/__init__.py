"""The local control socket: varlink-shaped JSON messages, each ended by a NUL byte."""
