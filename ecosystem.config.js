// PM2: one app per processor; scale thread sync with `pm2 scale nova-threads 5`.
// Python processes run in fork mode (PM2's cluster mode is for Node), one per instance.
// Settings come from the environment or from .env in this folder (the apps' working directory).
//
// Metrics: every instance serves Prometheus /metrics and /healthz on its own NOVA_METRICS_PORT.
// Each app has a block of 100 ports from NOVA_METRICS_PORT_BASE (default 9100): the receiver
// 9100, webhooks 9200, backfill 9300, threads 9400, completion 9500, attachments 9600; PM2's
// increment_var gives instance N of an app its block's first port + N, so `pm2 scale` never
// makes two instances share one.
// NOVA_PYTHON picks the interpreter (a virtual environment's python); default python3.
// Optional: outbound webhooks (`python -m nova.hooks`, block 9700) only with NOVA_PM2_HOOKS=1
// (`NOVA_PM2_HOOKS=1 pm2 start ecosystem.config.js`), once `nova hooks add` has an endpoint.

const python = process.env.NOVA_PYTHON || "python3";
const metricsBase = Number(process.env.NOVA_METRICS_PORT_BASE || 9100);

const processor = (name, module, block, extra = {}) => ({
  name,
  script: python,
  args: ["-m", module],
  interpreter: "none",
  exec_mode: "fork",
  cwd: __dirname,
  autorestart: true,
  kill_timeout: 40000, // ms; in-flight jobs get NOVA_SHUTDOWN_GRACE_SECONDS to finish
  increment_var: "NOVA_METRICS_PORT",
  env: {
    PYTHONUNBUFFERED: "1",
    NOVA_METRICS_PORT: String(metricsBase + 100 * block),
  },
  ...extra,
});

module.exports = {
  apps: [
    processor("nova-receiver", "nova.receiver", 0),
    processor("nova-webhooks", "nova.webhooks", 1),
    processor("nova-backfill", "nova.backfill", 2),
    processor("nova-threads", "nova.threads", 3, { instances: 2 }),
    processor("nova-completion", "nova.completion", 4),
    // Files go to NOVA_ATTACHMENT_PATH (the NAS mount); `pm2 scale nova-attachments 3`.
    processor("nova-attachments", "nova.attachments", 5),
    ...(process.env.NOVA_PM2_HOOKS === "1" ? [processor("nova-hooks", "nova.hooks", 6)] : []),
  ],
};
