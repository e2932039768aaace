"""The policies Laneway ships (data only): ``tiny.yaml`` is the embedded default's, which
``laneway serve`` applies when no ``--policy`` is given, from any directory."""
