//! virtio-mmio transport (version 2, "modern"), one 4 KiB window per
//! device; the kernel learns about it from `virtio_mmio.device=` on its
//! command line.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x444f_5056; // "VPOD"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: Interrupt) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
            config_generation: 0,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue max sizes are powers of two"))
            .collect()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.active = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let mut new = new;
        if new & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::warn!(
                    driver = format_args!("{:#x}", self.driver_features),
                    offered = format_args!("{offered:#x}"),
                    "virtio driver accepted features we do not offer"
                );
                new &= !STATUS_FEATURES_OK;
            } else {
                self.device.ack_features(self.driver_features);
            }
        }
        self.status = new;
        if new & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let bad = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem));
        if let Some(i) = bad {
            tracing::warn!(queue = i, "virtio queue invalid at activation");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let queues = std::mem::take(&mut self.queues);
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!(error = %e, "virtio device activation failed");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn read_u32(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => {
                let sel = self.queue_sel as usize;
                if self.active {
                    0
                } else {
                    self.device.queue_max_sizes().get(sel).copied().unwrap_or(0) as u32
                }
            }
            REG_QUEUE_READY => self.selected_queue().map(|q| q.ready() as u32).unwrap_or(0),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio read of unknown register");
                0
            }
        }
    }

    fn write_u32(&mut self, offset: u64, v: u32) {
        // Queue layout may only change before the driver is done.
        let queue_setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW if queue_setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            REG_QUEUE_DESC_HIGH if queue_setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            REG_QUEUE_AVAIL_LOW if queue_setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            REG_QUEUE_AVAIL_HIGH if queue_setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            REG_QUEUE_USED_LOW if queue_setup => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            REG_QUEUE_USED_HIGH if queue_setup => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            REG_QUEUE_NOTIFY => {
                if self.active {
                    self.device.queue_notify(v as u16);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => tracing::debug!(offset, value = v, "virtio-mmio write ignored"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_u32(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_u32(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util;
    use crate::devices::virtio::ActivateError;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct State {
        activated: Option<usize>,
        notified: Vec<u16>,
        resets: usize,
        acked: u64,
    }

    struct Dummy(Arc<Mutex<State>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn ack_features(&mut self, f: u64) {
            self.0.lock().unwrap().acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(
            &mut self,
            _m: GuestMemoryMmap,
            _i: Interrupt,
            q: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activated = Some(q.len());
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.0.lock().unwrap().notified.push(index);
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn stats(&self) -> (&'static str, String) {
            ("dummy", String::new())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<State>>) {
        let st = Arc::new(Mutex::new(State::default()));
        let (irq, _) = test_util::irq();
        (
            MmioTransport::new(Box::new(Dummy(st.clone())), test_util::mem(), irq),
            st,
        )
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queues(t: &mut MmioTransport) {
        for (i, base) in [(0u32, 0x10000u64), (1, 0x20000)] {
            w(t, REG_QUEUE_SEL, i);
            w(t, REG_QUEUE_NUM, 8);
            w(t, REG_QUEUE_DESC_LOW, base as u32);
            w(t, REG_QUEUE_AVAIL_LOW, base as u32 + 0x1000);
            w(t, REG_QUEUE_USED_LOW, base as u32 + 0x2000);
            w(t, REG_QUEUE_READY, 1);
        }
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1 << 5);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, REG_DEVICE_FEATURES),
            1,
            "VERSION_1 in the high word"
        );
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        let mut b = [0u8; 2];
        t.read(0x101, &mut b);
        assert_eq!(b, [2, 3], "config space");
        let mut odd = [9u8; 2];
        t.read(REG_MAGIC, &mut odd);
        assert_eq!(odd, [0, 0], "non-32-bit register reads are zero");
    }

    #[test]
    fn feature_negotiation_and_activation() {
        let (mut t, st) = transport();
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 5);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(st.lock().unwrap().acked, (1 << 5) | VIRTIO_F_VERSION_1);
        setup_queues(&mut t);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(
            st.lock().unwrap().notified.is_empty(),
            "no notify before DRIVER_OK"
        );
        w(&mut t, REG_STATUS, 0xf);
        assert!(t.is_active());
        assert_eq!(st.lock().unwrap().activated, Some(2));
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(st.lock().unwrap().notified, vec![1]);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(st.lock().unwrap().resets, 1);
    }

    #[test]
    fn unknown_features_rejected() {
        let (mut t, st) = transport();
        w(&mut t, REG_DRIVER_FEATURES, 1 << 7);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 0xb);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, REG_STATUS, 0xf);
        assert!(!t.is_active());
        assert_eq!(st.lock().unwrap().activated, None);
    }

    #[test]
    fn legacy_driver_without_version1_rejected() {
        let (mut t, _) = transport();
        w(&mut t, REG_DRIVER_FEATURES, 1 << 5);
        w(&mut t, REG_STATUS, 0xb);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (mut t, st) = transport();
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 8);
        w(&mut t, REG_QUEUE_DESC_LOW, 0xffff_0000);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0xff);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, 0xf);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_eq!(st.lock().unwrap().activated, None);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let st = Arc::new(Mutex::new(State::default()));
        let (irq, count) = test_util::irq();
        let mut t = MmioTransport::new(Box::new(Dummy(st)), test_util::mem(), irq.clone());
        irq.signal_used();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }
}
