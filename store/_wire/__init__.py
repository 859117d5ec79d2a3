"""The wire format: the generated gRPC code, value encoding (pickle protocol 5 with
out-of-band buffers, chunked streams), errors on the wire, the cross-language value
and status tables, and the transfer meter."""
