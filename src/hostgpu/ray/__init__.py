"""hostgpu on a Ray cluster: the same functions, routing rule and device truth.

- :mod:`~hostgpu.ray.resources`: the one mapping from probed devices to Ray resources and
  labels, and from a function's ``gpu``/``memory``/``labels`` to a Ray request (no Ray
  import: pure functions);
- :mod:`~hostgpu.ray.node`: ``hostgpu ray start`` / ``status``;
- :mod:`~hostgpu.ray.backend`: :class:`RayBackend`, what ``hostgpu.connect("ray://…")``
  returns;
- :mod:`~hostgpu.ray.runner`: what runs inside a Ray worker for one call.

Ray itself is imported only when a backend connects or a command runs (the ``ray`` extra).
"""
