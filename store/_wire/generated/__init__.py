"""Code generated from proto/claypot.proto by tools/gen_proto.sh; do not edit."""
