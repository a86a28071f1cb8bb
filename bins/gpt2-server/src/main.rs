//! `gpt2-server`: the GPT-2 API over HTTP, as SageMaker expects a model container to serve it.

mod api_error;
mod args;
mod auth;
mod body_budget;
mod budget;
mod head_guard;
mod metrics;
mod openai;
mod playground;
mod routes;
mod serve;
mod streaming;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use gpt2_engine::{Engine, Pipeline};
use tracing::{error, info, warn};

use crate::args::ServerArgs;

fn main() -> ExitCode {
    gpt2_engine::return_freed_memory_to_os();
    let args = ServerArgs::parse_or_exit();
    args::init_logging(args.log_format);
    if let Some(workers) = std::env::var_os(args::SAGEMAKER_WORKERS_ENV)
        .filter(|value| !value.to_string_lossy().trim().is_empty())
    {
        warn!(
            value = %workers.to_string_lossy(),
            "{} is ignored: one inference worker batches every request; \
             scale out with instances or replicas",
            args::SAGEMAKER_WORKERS_ENV
        );
    }
    if let Err(e) = args.auth_config() {
        error!("{e}");
        return ExitCode::from(2);
    }
    if let Err(e) = gpt2_engine::Isa::from_env() {
        error!("{e}");
        return ExitCode::from(2);
    }
    // The compute threads get names of their own (`top -H`, `perf`): otherwise they take the
    // name of the thread that first used the pool, a Tokio worker. RAYON_NUM_THREADS still sets
    // how many there are.
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("gpt2-compute-{i}"))
        .build_global()
    {
        warn!("the compute threads keep rayon's defaults: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: ServerArgs) -> Result<(), String> {
    let port = args.port();
    let addr = SocketAddr::new(args.host, port);
    let spec = args.model_spec()?;
    let hub_options = args.hub_options();
    let auth = args.auth_config()?;
    let loading = std::time::Instant::now();
    // Resolve (a repository id may be downloaded) and load before binding: /ping only answers
    // once the model is ready.
    let pipeline = tokio::task::spawn_blocking(move || {
        if let Some(gpt2_hub::ModelSpec::Hub(repo)) = &spec {
            info!(
                repo = %repo,
                revision = %hub_options.revision,
                cache = %hub_options.cache_dir.display(),
                offline = hub_options.offline,
                "resolving the model through the Hugging Face cache"
            );
        }
        let source = ServerArgs::model_source(spec.as_ref(), &hub_options)?;
        Pipeline::from_source_with_format(&source, args.dtype)
            .map_err(|e| format!("cannot load the model as {:?}: {e}", args.dtype))
    })
    .await
    .map_err(|e| format!("model loading panicked: {e}"))??;
    let pipeline = pipeline
        .with_kv_format(args.kv_dtype)
        .with_limits(args.limits());
    info!(
        model = ?pipeline.source(),
        dtype = ?args.dtype,
        kv_dtype = ?args.kv_dtype,
        isa = %gpt2_engine::Isa::active(),
        load_ms = loading.elapsed().as_millis() as u64,
        "model loaded"
    );
    let load_time = loading.elapsed();
    let limits = *pipeline.limits();
    let engine_config = args.engine_config(budget::default_kv_budget());
    info!(
        kv_budget_mb = engine_config.kv_budget_bytes >> 20,
        "KV-cache budget (--kv-budget-mb)"
    );
    let served_model = openai::ServedModel::new(
        args.served_model_name.as_deref(),
        args.model.as_deref(),
        pipeline.source(),
    );
    let (engine, worker) = Engine::start(pipeline, engine_config)
        .map_err(|e| format!("cannot start the inference worker: {e}"))?;
    let build = metrics::BuildInfo {
        dtype: format!("{:?}", args.dtype).to_lowercase(),
        kv_dtype: format!("{:?}", args.kv_dtype).to_lowercase(),
        isa: gpt2_engine::Isa::active().to_string(),
    };
    let handle = metrics::install(&build, load_time)?;
    let app = routes::router(
        routes::AppState::new(engine, limits)
            .with_auth(auth)
            .with_metrics(handle)
            .with_served_model(served_model)
            .with_body_budget(args.body_budget()),
    );
    let listener = serve::listen(addr, args.max_connections)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    let open_files = serve::raise_open_file_limit();
    info!(
        addr = %bound,
        queue_capacity = args.queue_capacity,
        deadline_secs = args.deadline_secs(),
        shutdown_grace_secs = args.shutdown_grace_secs,
        max_connections = args.max_connections,
        body_budget_mb = args.body_budget_mb,
        serve_half_closed = args.serve_half_closed,
        prefill_chunk_tokens = args.prefill_chunk_tokens,
        max_prefill_stall_percent = args.max_prefill_stall_percent,
        max_batch_rows = args.max_batch_rows,
        open_files = open_files.unwrap_or(0),
        "listening"
    );

    // Freed request bodies and caches below the mmap threshold stay in the allocator's arenas:
    // hand them back to the OS now and then (a few milliseconds on a quiet heap).
    tokio::spawn(async {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(gpt2_engine::trim_freed_memory).await;
        }
    });
    let shutdown = std::sync::Arc::new(tokio::sync::Notify::new());
    let signalled = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signalled.notify_waiters();
    });
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let graceful = shutdown.clone();
    let stop_accepting = async move {
        graceful.notified().await;
        info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new connections, finishing in-flight requests"
        );
    };
    if !serve::serve(
        listener,
        app,
        args.connection_limits(),
        stop_accepting,
        grace,
    )
    .await
    {
        warn!("in-flight requests did not finish within the grace period; they were dropped");
    }
    drop(worker); // the worker thread ends with the process
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = terminate => info!("SIGTERM received"),
    }
}
