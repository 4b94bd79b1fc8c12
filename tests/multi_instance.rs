//! Two relay instances acting as one chat, per backend. The broker backends
//! add themselves here: each gives the harness two separate bus connections.
mod common;

use std::sync::Arc;

use chat_relay::bus::MessageBus;
use chat_relay::bus::memory::MemoryBus;
use common::app::sqlite_db;
use common::multi::{gateway_crash_clients_resume_on_the_other, two_instances_act_as_one};

#[tokio::test]
async fn memory_two_applications_on_one_in_process_bus() {
    // `memory` is single-process: two applications only share it in one process.
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    two_instances_act_as_one(bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_gateway_crash_clients_resume_on_the_other() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    gateway_crash_clients_resume_on_the_other(bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_resume_is_a_proof() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    common::multi::resume_is_a_proof(bus.clone(), bus.clone(), bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_send_retries_are_published_once() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    common::multi::send_retries_are_published_once(bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_presence_is_cluster_wide() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    common::multi::presence_is_cluster_wide(bus.clone(), bus.clone(), bus, &db).await;
}
