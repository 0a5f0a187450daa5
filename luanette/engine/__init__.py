"""The Lua engine: the contract namespaces implement (``api``), the sandbox and its
warm states (``lua``), and the worker processes that run scripts for the front
(``worker``, ``pool``, ``channel``)."""
