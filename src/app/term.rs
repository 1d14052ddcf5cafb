//! One leader term: the relay client, the pipeline, the progress reporter, the cleanup jobs and
//! (with identity resolution) stub re-resolution, as named tasks of one [`Tasks`] registry under
//! the term's token, and how the term ends (shutdown, lease lost, fenced, failed).

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant};

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cursor::CursorKey;
use crate::cursor::{AnchorError, WriteCursorError};
use crate::firehose::client;
use crate::jobs;
use crate::leader::Leadership;
use crate::pipeline::{self, Input, PipelineError};
use crate::resync::backfill::{self, BackfillConfig, BackfillError};
use crate::resync::{run_workers, Held, Live, ResyncConfig, ResyncStats, Resyncer};
use crate::tasks::{TaskError, Tasks};
use crate::txn::TxError;
use crate::writer::WriteError;

use super::anchor;
use super::lead::Ctx;
use super::{progress, AppError};

/// Part of the drain limit kept for releasing the lease after the pipeline drained.
const RELEASE_RESERVE: Duration = Duration::from_millis(1_000);

/// How a term ended.
pub(super) enum TermEnd {
    /// Shutdown: drained (or not, `result`); release the lease before `deadline`.
    Shutdown {
        deadline: Instant,
        result: Result<(), AppError>,
    },
    /// The lease was lost: everything was aborted.
    Lost,
    /// A newer leader claimed the fence: our last batch rolled back.
    Fenced,
    /// A task failed.
    Failed(AppError),
}

/// The write error that means a newer leader holds the fence.
fn is_fenced(e: &AppError) -> bool {
    matches!(
        e,
        AppError::Pipeline(PipelineError::Write(TxError::Permanent {
            source: WriteError::Fenced { .. },
            ..
        })) | AppError::Anchor(AnchorError::Write(WriteCursorError::Fenced { .. }))
    )
}

/// Runs one term from `resume` until shutdown, loss of `leadership`, or a task ending.
pub(super) async fn term(ctx: &Ctx<'_>, leadership: &Leadership, resume: Option<i64>) -> TermEnd {
    let cfg = ctx.cfg;
    let shutdown = ctx.shutdown;
    let mut pcfg = cfg.pipeline.clone();
    pcfg.cursor = CursorKey {
        service: ctx.service.to_owned(),
        fence: leadership.fence,
    };
    let resume = match anchor::start_point(ctx.pool, &pcfg.cursor, resume, cfg.start_cursor).await {
        Ok(r) => r,
        Err(e) if is_fenced(&e) => return TermEnd::Fenced,
        Err(e) => return TermEnd::Failed(e),
    };
    let mut tasks: Tasks<AppError> = Tasks::new(shutdown.child_token());
    let term = tasks.token().clone();
    let (cursor_tx, cursor_rx) = watch::channel(resume);
    // Frames queued between the relay client and the pipeline: as many as the live queue's
    // share of the memory budget holds at the frame size limit (the pipeline has its own).
    let frame_queue = cfg
        .pipeline
        .budget
        .live_queue_frames(cfg.pipeline.max_frame_bytes);
    let (frames_tx, frames_rx) = mpsc::channel(frame_queue);
    let client_run = client::run_reporting(
        cfg.relay.clone(),
        ctx.seen_seq.clone(),
        cursor_rx.clone(),
        frames_tx,
        term.clone(),
    );
    tasks.spawn("relay client", async move { Ok(client_run.await?) });
    // No stored cursor: the live tail's first seq is made durable before the pipeline sees it.
    let frames_rx = match resume {
        Some(_) => frames_rx,
        None => {
            let (anchored_tx, anchored_rx) = mpsc::channel(frame_queue);
            let anchor = anchor::forward(
                ctx.pool.clone(),
                pcfg.cursor.clone(),
                frames_rx,
                anchored_tx,
            );
            tasks.spawn("cursor anchor", anchor);
            anchored_rx
        }
    };
    // Resync workers (and the backfill listing) while leading, fenced like the batches. The
    // held-event store is shared with the pipeline, which holds live events of repos in resync.
    let held = cfg.resync.as_ref().map(|r| Arc::new(Held::new(r.held)));
    if let (Some(rcfg), Some(held)) = (&cfg.resync, &held) {
        let live = Live {
            fence: pcfg.cursor.clone(),
            held: held.clone(),
        };
        let resolver = ctx.creator.and_then(|c| c.resolver().cloned());
        let resyncer = match Resyncer::new(
            ctx.pool.clone(),
            rcfg.clone(),
            &cfg.pipeline.users.identity,
            resolver,
            Some(live),
        ) {
            Ok(r) => Arc::new(r),
            Err(e) => return TermEnd::Failed(AppError::Resync(e)),
        };
        if cfg.backfill {
            tasks.spawn(
                "backfill listing",
                run_backfill(ctx, rcfg, resyncer.stats().clone(), term.clone()),
            );
        }
        let workers = run_workers(resyncer, CancellationToken::new(), term.clone());
        tasks.spawn("resync workers", async move {
            workers.await;
            Ok(())
        });
    }
    let pipeline_run = pipeline::run(
        ctx.pool.clone(),
        pcfg,
        pipeline::PipelineHandles {
            durable: Some(cursor_tx),
            creator: ctx.creator.cloned(),
            held,
        },
        Input::Live(frames_rx),
        term.clone(),
        ctx.stats.clone(),
    );
    tasks.spawn("pipeline (decode, batch, write)", async move {
        Ok(pipeline_run.await?)
    });
    tasks.spawn(
        "progress reporter",
        progress::report(
            ctx.elector.clone(),
            ctx.seen_seq.clone(),
            cursor_rx,
            ctx.life.health.clone(),
            ctx.service.to_owned(),
            leadership.fence,
            term.clone(),
        ),
    );
    let jobs_run = jobs::run(ctx.pool.clone(), cfg.jobs.clone(), term.clone());
    tasks.spawn("cleanup jobs", async move {
        jobs_run.await;
        Ok(())
    });
    if let Some(creator) = ctx.creator {
        let reresolve = jobs::run_reresolve(
            ctx.pool.clone(),
            creator.clone(),
            cfg.reresolve_interval,
            term.clone(),
        );
        tasks.spawn("stub re-resolution", async move {
            reresolve.await;
            Ok(())
        });
    }

    let lost = leadership.lost.clone();
    let first = tokio::select! {
        biased;
        _ = lost.cancelled() => None,
        _ = shutdown.cancelled() => Some(None),
        ended = tasks.next() => Some(Some(ended)),
    };
    let ended = match first {
        None => {
            term.cancel();
            tasks.abort_all().await;
            return TermEnd::Lost;
        }
        Some(None) => {
            // Graceful: `term` is a child of `shutdown`, so the client stopped reading and the
            // pipeline is draining.
            ctx.life.draining();
            let deadline = Instant::now() + cfg.drain_limit;
            let drain_until = deadline - RELEASE_RESERVE.min(cfg.drain_limit / 4);
            let result = tokio::select! {
                biased;
                _ = lost.cancelled() => {
                    tasks.abort_all().await;
                    return TermEnd::Lost;
                }
                r = tasks.drain(drain_until) => r,
            };
            return TermEnd::Shutdown { deadline, result };
        }
        Some(Some(ended)) => ended,
    };
    // A task ended on its own; a failure already cancelled `term`. A failing pipeline cancels
    // `term` itself, so the relay client or a helper may end first, cleanly: then the others
    // are drained (bounded) to find the failure that decides.
    let name = ended.name;
    let result = match ended.into_result() {
        Err(e) => Err(e),
        Ok(()) => {
            tokio::select! {
                biased;
                _ = lost.cancelled() => Ok(()),
                r = tasks.drain(Instant::now() + cfg.drain_limit) => r,
            }
        }
    };
    tasks.abort_all().await;
    match result {
        Err(e) if is_fenced(&e) => TermEnd::Fenced,
        _ if lost.is_cancelled() => TermEnd::Lost,
        Err(e) => TermEnd::Failed(e),
        Ok(()) if shutdown.is_cancelled() => {
            ctx.life.draining();
            TermEnd::Shutdown {
                deadline: Instant::now() + RELEASE_RESERVE,
                result: Ok(()),
            }
        }
        Ok(()) => TermEnd::Failed(TaskError::Stopped { name }.into()),
    }
}

/// `run --backfill`: lists the relay's repos for the term's resync workers, logs the outcome,
/// then idles until the term ends (a finished backfill is not started again by later terms). A
/// failed listing is logged, not fatal: the next term resumes it.
fn run_backfill(
    ctx: &Ctx<'_>,
    rcfg: &ResyncConfig,
    stats: Arc<ResyncStats>,
    term: CancellationToken,
) -> impl std::future::Future<Output = Result<(), AppError>> + Send + 'static {
    let bcfg = BackfillConfig {
        relay_url: (ctx.cfg.backfill_url.as_ref())
            .unwrap_or(&ctx.cfg.relay.relay_url)
            .clone(),
        page_limit: backfill::DEFAULT_PAGE_LIMIT,
        identity: ctx.cfg.pipeline.users.identity.clone(),
        resync: rcfg.clone(),
        retry: ctx.cfg.pipeline.retry.clone(),
    };
    let pool = ctx.pool.clone();
    async move {
        let listing = backfill::list(pool, bcfg, false, Arc::default(), stats, term.clone());
        match listing.await {
            Ok(report) => tracing::info!(
                listed = report.listed,
                done = report.done,
                inactive = report.inactive,
                failed = report.failed.len(),
                "backfill finished"
            ),
            Err(BackfillError::Interrupted) => {}
            Err(e) => tracing::error!(error = %e, "backfill stopped; the next term resumes it"),
        }
        term.cancelled().await;
        Ok(())
    }
}
