"""Laneway's public face: the ``laneway`` CLI, ``laneway serve`` and the Python client
(``laneway.client``).

The only package that imports more than one of ``controlplane``, ``router``, ``engines``
and ``verifier``; none of them imports it.
"""
