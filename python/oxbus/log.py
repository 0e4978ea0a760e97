"""Logging integration: the envelope being handled, on every log record.

```python
import logging, oxbus

handler = logging.StreamHandler()
handler.addFilter(oxbus.CorrelationFilter())
handler.setFormatter(logging.Formatter(
    "%(asctime)s %(levelname)s [%(correlation_id)s %(event_id)s] %(name)s: %(message)s"))
logging.getLogger().addHandler(handler)
```

Inside a handler (and in tasks and thread-pool calls it starts) every record that reaches that
logging handler — from your loggers and from oxbus's — gets ``correlation_id``, ``event_id``,
``causation_id`` and ``event_type`` from [`oxbus.current_envelope`][oxbus.current_envelope]; outside
handlers they are ``"-"``. The bus's own logger (``"oxbus"``) carries the filter already, so its
records have the fields wherever they go.
"""

from __future__ import annotations

import logging

from oxbus._oxbus import current_envelope

__all__ = ["FIELDS", "CorrelationFilter"]

#: The record attributes the filter sets.
FIELDS = ("correlation_id", "event_id", "causation_id", "event_type", "subscription", "attempt")


class CorrelationFilter(logging.Filter):
    """A ``logging.Filter`` that adds the handled event's ids to each record and lets every
    record through.

    Attach it to a *handler* (``handler.addFilter(CorrelationFilter())``) to cover records
    from every logger; a filter on a logger only sees records logged to that very logger.
    Attributes already on the record (for example given with ``extra=``) are kept.
    ``default`` is the value used outside handlers and for a root event's causation id.
    """

    def __init__(self, name: str = "", default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        env = current_envelope()
        d = record.__dict__
        default = self.default
        if env is None:
            for attr in FIELDS:
                if d.get(attr) is None:
                    d[attr] = default
            return True
        values = (
            env.correlation_id, env.event_id, env.causation_id, env.event_type, env.subscription,
            env.attempt,
        )
        for attr, value in zip(FIELDS, values):
            if d.get(attr) is None:
                d[attr] = default if value is None else str(value)
        return True


# Every record the bus writes carries the fields, whatever handler it reaches.
_bus_logger = logging.getLogger("oxbus")
if not any(isinstance(f, CorrelationFilter) for f in _bus_logger.filters):
    _bus_logger.addFilter(CorrelationFilter())
