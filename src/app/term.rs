//! One leader term: the relay client, the pipeline, the progress reporter, the cleanup jobs and
//! (with identity resolution) stub re-resolution, as named tasks of one [`Tasks`] registry under
//! the term's token, and how the term ends (shutdown, lease lost, fenced, failed).

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant};

use crate::cursor::CursorKey;
use crate::cursor::{AnchorError, WriteCursorError};
use crate::firehose::client;
use crate::jobs;
use crate::leader::Leadership;
use crate::pipeline::{self, Input, PipelineError};
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
    let mut pcfg = cfg.pipeline.clone();
    pcfg.cursor = CursorKey {
        service: ctx.service.to_owned(),
        fence: leadership.fence,
    };
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
    let pipeline_run = pipeline::run(
        ctx.pool.clone(),
        pcfg,
        pipeline::PipelineHandles {
            durable: Some(cursor_tx),
            creator: ctx.creator.cloned(),
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
