// A second gRPC implementation against llmgrpc-server: grpc-js (Node's own
// HTTP/2), for tests/unit/test_transport_interop.py. Prints one JSON object.
// usage: node grpc_js_client.js HOST:PORT PROTO_DIR
'use strict';
const path = require('path');
const tools = path.join(__dirname, '..', '..', '.tools', 'node_modules');
const grpc = require(path.join(tools, '@grpc', 'grpc-js'));
const loader = require(path.join(tools, '@grpc', 'proto-loader'));

const [target, protoDir] = process.argv.slice(2);
const definition = loader.loadSync('llmgrpc/v1/llm_service.proto', {
  includeDirs: [protoDir], keepCase: true, longs: Number, enums: String, oneofs: true,
});
const { LLMService } = grpc.loadPackageDefinition(definition).llmgrpc.v1;
const client = new LLMService(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 30000);

function unary(method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: deadline() }, (err, response) => {
      resolve(err ? { code: err.code, details: err.details } : { code: 0, response });
    });
  });
}

function stream(request, metadata) {
  return new Promise((resolve) => {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(metadata || {})) md.set(k, v);
    const call = client.GenerateStream(request, md, { deadline: deadline() });
    const out = { tokens: [], text: '', messages: 0, initial: {} };
    call.on('metadata', (m) => { out.initial = m.getMap(); });
    call.on('data', (m) => { out.messages += 1; out.tokens.push(...m.token_ids); out.text += m.text; });
    call.on('error', (err) => resolve({ ...out, code: err.code, details: err.details }));
    call.on('status', (s) => { if (s.code === 0) resolve({ ...out, code: 0 }); });
  });
}

(async () => {
  const result = {};
  result.tokenize = await unary('Tokenize', { text: 'hello world' });
  result.stream = await stream({ prompt: 'hi', sampling: { max_tokens: 12 } }, { 'x-request-id': 'js-1' });
  result.concurrent = await Promise.all(
    [...Array(16).keys()].map((i) => stream({ prompt: `p${i}`, sampling: { max_tokens: 40 } })));
  result.invalid = await unary('Generate', { prompt: 'hi', sampling: { temperature: -1 } });
  console.log(JSON.stringify(result));
  client.close();
})();
