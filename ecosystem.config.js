// PM2: one process per processor; scale thread sync with `pm2 scale nova-threads 5`.
// Python processes run in fork mode (PM2's cluster mode is for Node), one per instance.
// Settings come from the environment or from .env in the working directory.
const processor = (name, module, extra = {}) => ({
  name,
  script: "python3",
  args: ["-m", module],
  interpreter: "none",
  exec_mode: "fork",
  autorestart: true,
  kill_timeout: 40000, // ms; in-flight jobs get NOVA_SHUTDOWN_GRACE_SECONDS to finish
  env: { PYTHONUNBUFFERED: "1" },
  ...extra,
});

module.exports = {
  apps: [
    processor("nova-receiver", "nova.receiver"),
    processor("nova-webhooks", "nova.webhooks"),
    processor("nova-backfill", "nova.backfill"),
    processor("nova-threads", "nova.threads", { instances: 2 }),
    processor("nova-completion", "nova.completion"),
  ],
};
