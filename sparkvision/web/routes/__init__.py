"""The REST API and pages, one ``APIRouter`` per concern; :func:`sparkvision.web.app.create_app` includes them.

- :mod:`.classify`: ``POST /api/classify`` (uploads -> labels, micro-batched)
- :mod:`.search`: ``POST /api/search`` (an upload -> its nearest images in the index)
- :mod:`.jobs`: ``/api/jobs...`` (kinds, submit, list, get, cancel, resume, metrics)
- :mod:`.data`: ``/api/models...`` and ``/api/tables...`` (what is under the data roots)
- :mod:`.pages`: ``/`` (the web page) and ``/api/health``

What the routes share (settings, job store, runner, loaded models) is one :class:`.state.State`
on ``app.state.sv``, which endpoints get through the ``StateDep`` dependency; errors are
:class:`~sparkvision.web.security.ApiError`, turned into JSON by the handlers in ``create_app``.
"""
