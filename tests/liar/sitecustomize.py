"""Put on PYTHONPATH of one `fedmi site` by the deployment tests: a hospital that changed its own
fedmi to lie to the server. $FEDMI_TEST_LIE names the lies, comma-separated:

- "impostor": it introduces itself as Hungary, whatever its key was enrolled as;
- "inflate": its training replies count 10**9 examples (to take over the weighted mean);
- "results": its evaluation replies report ACC = AUC = 1.0 over 9999 cases.
"""

import os

_LIES = set(filter(None, os.environ.get("FEDMI_TEST_LIE", "").split(",")))

if _LIES:
    import fedmi.apps.site as site
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    honest = site.app

    def lying(message, context):
        reply = honest(message=message, context=context)
        if reply.has_error():
            return reply
        content = RecordDict(dict(reply.content))
        kind = message.metadata.message_type
        if kind == "query" and "impostor" in _LIES:
            content["site"] = ConfigRecord({**dict(content["site"]), "name": "Hungary"})
        if kind == "train" and "inflate" in _LIES:
            content["metrics"] = MetricRecord({**dict(content["metrics"]), "num-examples": 10**9})
        if kind == "evaluate" and "results" in _LIES:
            content["metrics"] = MetricRecord({**dict(content["metrics"]), "acc": 1.0, "auc": 1.0,
                                               "num-examples": 9999})
        return Message(content, reply_to=message)

    site.app = lying
