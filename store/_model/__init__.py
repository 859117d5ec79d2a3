"""The object model: ``StorageObject``, proxy classes and the dispatcher seam.

A call on a proxy goes to whatever dispatcher is installed: the client in an
application process, the heap inside a backend. Nothing here speaks gRPC.
"""
