// DynamicsWebApi (npm) pointed at the proxy: each scenario prints one JSON
// line with what the client read, and tests/it/clients.rs checks it
// against the simulator.
//
// Environment: DVP_URL (the proxy, http:// or https://), DVP_TOKEN (the
// bearer handed to the client), DVP_ORG (the org's host, which must reach
// the client nowhere), NODE_EXTRA_CA_CERTS (the proxy's CA, over TLS),
// DVP_NODE_MODULES (where tests/clients/install.sh installed the client).

import http from "node:http";
import https from "node:https";
import { createRequire } from "node:module";

const { DynamicsWebApi } = createRequire(`${process.env.DVP_NODE_MODULES}/`)("dynamics-web-api");

const URL_BASE = process.env.DVP_URL;
const ORG = process.env.DVP_ORG;
const seen = { requests: 0, outside: [], org_in_answer: [] };

// Every request the client sends and every answer it reads pass here.
for (const [scheme, module] of [["http:", http], ["https:", https]]) {
  const request = module.request;
  module.request = function (options, callback) {
    const url = `${options.protocol ?? scheme}//${options.hostname ?? options.host}:${options.port}${options.path}`;
    seen.requests += 1;
    if (!url.startsWith(URL_BASE + "/")) seen.outside.push(url);
    return request.call(module, options, (res) => {
      const headers = JSON.stringify(res.headers);
      if (headers.includes(ORG)) seen.org_in_answer.push(url);
      res.on("data", (chunk) => {
        if (chunk.toString().includes(ORG)) seen.org_in_answer.push(url);
      });
      callback(res);
    });
  };
}

const api = new DynamicsWebApi({
  serverUrl: URL_BASE,
  dataApi: { version: "9.2" },
  onTokenRefresh: async () => process.env.DVP_TOKEN,
});

async function tables() {
  const listed = await api.retrieveEntities({ select: ["LogicalName", "EntitySetName"] });
  const account = await api.retrieveEntity({
    key: "LogicalName='account'",
    select: ["EntitySetName", "PrimaryIdAttribute", "LogicalName"],
    expand: [{ property: "Attributes", select: ["LogicalName", "AttributeType"] }],
  });
  return {
    logical_names: listed.value.map((t) => t.LogicalName).sort(),
    account: {
      entity_set: account.EntitySetName,
      logical_name: account.LogicalName,
      primary_id: account.PrimaryIdAttribute,
      attributes: account.Attributes.map((a) => a.LogicalName).sort(),
    },
  };
}

async function paging() {
  const all = await api.retrieveAll({
    collection: "accounts",
    select: ["name", "accountid"],
    filter: "statecode eq 0",
    maxPageSize: 7,
  });
  return { ids: all.value.map((r) => r.accountid) };
}

async function crud() {
  const id = await api.create({
    collection: "contacts",
    data: { firstname: "Ada", lastname: "Lovelace" },
  });
  await api.update({ collection: "contacts", key: id, data: { jobtitle: "Analyst" } });
  const read = await api.retrieve({
    collection: "contacts",
    key: id,
    select: ["firstname", "lastname", "jobtitle"],
  });
  await api.deleteRecord({ collection: "contacts", key: id });
  let gone = false;
  try {
    await api.retrieve({ collection: "contacts", key: id });
  } catch (e) {
    gone = e.status === 404;
  }
  return {
    id,
    read: { firstname: read.firstname, lastname: read.lastname, jobtitle: read.jobtitle },
    gone_after_delete: gone,
  };
}

async function batch() {
  api.startBatch();
  api.create({
    collection: "contacts",
    data: { firstname: "Grace", lastname: "Hopper" },
    contentId: "1",
  });
  api.create({
    collection: "accounts",
    data: { name: "Navy Labs", "primarycontactid@odata.bind": "$1" },
  });
  api.retrieveMultiple({ collection: "accounts", select: ["name"], top: 1 });
  const responses = await api.executeBatch({ inChangeSet: true });
  return {
    created: responses.slice(0, 2).map((r) => String(r)),
    last_is_page: Array.isArray(responses[2]?.value),
  };
}

async function changes() {
  const first = await api.retrieveAll({
    collection: "accounts",
    select: ["name"],
    trackChanges: true,
  });
  const deltaLink = first.oDataDeltaLink;
  const id = await api.create({ collection: "accounts", data: { name: "Delta Ltd" } });
  const delta = await api.retrieveMultiple({ collection: "accounts" }, deltaLink);
  return {
    first_rows: first.value.length,
    delta_link_through_proxy: typeof deltaLink === "string" && deltaLink.startsWith(URL_BASE + "/"),
    created: id,
    delta_ids: delta.value.map((r) => r.accountid),
  };
}

const scenarios = { tables, paging, crud, batch, changes };
for (const [name, run] of Object.entries(scenarios)) {
  try {
    console.log(JSON.stringify({ scenario: name, ok: true, data: await run() }));
  } catch (e) {
    console.log(
      JSON.stringify({ scenario: name, ok: false, error: `${e.name}: ${e.message}`, status: e.status }),
    );
  }
}
console.log(JSON.stringify({ scenario: "wire", ok: true, data: seen }));
