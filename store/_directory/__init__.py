"""The Redis directory adapter: object, alias, backend, class and replica-set keys and the
Lua scripts that keep them atomic. Used by backends and by cluster operations
(elastic drain and retire, ``claypot repair``); applications never touch Redis."""
