"""Microsoft's Python SDK for Dataverse (PowerPlatform-Dataverse-Client)
pointed at the proxy: each scenario prints one JSON line with what the
client read, and tests/it/clients.rs checks it against the simulator.

Environment: DVP_URL (the proxy, https://), DVP_TOKEN (the bearer the
credential hands the SDK), DVP_ORG (the org's host, which must reach the
client nowhere), REQUESTS_CA_BUNDLE (the proxy's CA).
"""

import json
import os
import sys
import traceback

import requests
from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse.client import DataverseClient

URL = os.environ["DVP_URL"]
ORG = os.environ["DVP_ORG"]
SEEN = {"requests": 0, "outside": [], "org_in_answer": []}

# Every request the SDK sends and every answer it reads pass here.
_send = requests.Session.send


def _recording_send(self, request, **kwargs):
    SEEN["requests"] += 1
    if not request.url.startswith(URL + "/"):
        SEEN["outside"].append(request.url)
    response = _send(self, request, **kwargs)
    text = response.text + json.dumps(dict(response.headers))
    if ORG in text:
        SEEN["org_in_answer"].append(request.url)
    return response


requests.Session.send = _recording_send


class StaticCredential:
    """An azure-core TokenCredential handing out the token the test made for
    the proxy's API (the SDK asks for `{DVP_URL}/.default`)."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken(os.environ["DVP_TOKEN"], 4102444800)


def tables(client):
    listed = client.tables.list(select=["LogicalName", "EntitySetName"])
    info = client.tables.get("account")
    return {
        "logical_names": sorted(t["LogicalName"] for t in listed),
        "account": {
            "entity_set": info["entity_set_name"],
            "logical_name": info["table_logical_name"],
            "primary_id": info.primary_id_attribute,
        },
    }


def paging(client):
    ids, pages = [], 0
    for page in client.records.list_pages(
        "account",
        select=["name", "accountid"],
        filter="statecode eq 0",
        page_size=7,
    ):
        pages += 1
        ids.extend(r["accountid"] for r in page)
    return {"ids": ids, "pages": pages}


def crud(client):
    record_id = client.records.create("contact", {"firstname": "Ada", "lastname": "Lovelace"})
    client.records.update("contact", record_id, {"jobtitle": "Analyst"})
    read = client.records.retrieve("contact", record_id, select=["firstname", "lastname", "jobtitle"])
    client.records.delete("contact", record_id)
    # The SDK answers None for Dataverse's 404.
    gone = client.records.retrieve("contact", record_id) is None
    return {
        "id": record_id,
        "read": {k: read[k] for k in ("firstname", "lastname", "jobtitle")},
        "gone_after_delete": gone,
    }


def batch(client):
    b = client.batch.new()
    with b.changeset() as cs:
        contact = cs.records.create("contact", {"firstname": "Grace", "lastname": "Hopper"})
        cs.records.create("account", {"name": "Navy Labs", "primarycontactid@odata.bind": contact})
    b.records.list("account", select=["name"], top=1)
    result = b.execute()
    return {
        "statuses": [r.status_code for r in result.responses],
        "has_errors": result.has_errors,
        "created": list(result.entity_ids),
    }


def main():
    scenarios = [("tables", tables), ("paging", paging), ("crud", crud), ("batch", batch)]
    with DataverseClient(URL, StaticCredential()) as client:
        for name, run in scenarios:
            try:
                line = {"scenario": name, "ok": True, "data": run(client)}
            except Exception as e:
                line = {
                    "scenario": name,
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc(limit=4),
                }
            print(json.dumps(line), flush=True)
    print(json.dumps({"scenario": "wire", "ok": True, "data": SEEN}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
