//! The 16550 serial console (vm-superio) at COM1, writing guest output to
//! stdout or a file. Built-in guests have no interrupts, so the interrupt
//! trigger does nothing. Console output is not held for output commit: it is
//! a debugging aid, not an acknowledgement to a client.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial, Trigger};

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved state is not a valid 16550 state.
    #[error("serial state is invalid")]
    BadState,
}

/// An interrupt line that goes nowhere (the built-in ABI has no interrupts).
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The console device.
pub struct Console {
    uart: Serial<NoIrq, NoEvents, Box<dyn Write + Send>>,
}

/// Saved 16550 registers (a serde mirror of vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Pending input bytes.
    pub in_buffer: Vec<u8>,
}

impl Console {
    /// A console in its power-on state writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            uart: Serial::new(NoIrq, out),
        }
    }

    /// Rebuild a console from saved registers.
    pub fn restore(out: Box<dyn Write + Send>, s: &SerialState) -> Result<Self, SerialError> {
        if s.in_buffer.len() > 64 {
            return Err(SerialError::BadState);
        }
        let r = s.regs;
        let st = SuperioState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        };
        let uart =
            Serial::from_state(&st, NoIrq, NoEvents, out).map_err(|_| SerialError::BadState)?;
        Ok(Console { uart })
    }

    /// Save the registers.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Guest reads register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Guest writes register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.uart.write(offset, value);
    }

    /// Flush buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

/// What [`Console`]'s restore needs besides its state: where output goes.
pub type ConsoleArgs = Box<dyn Write + Send>;

impl crate::persist::Persist<'_> for Console {
    type State = SerialState;
    type Args = ConsoleArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialState, SerialError> {
        Ok(Console::save(self))
    }

    fn restore(out: ConsoleArgs, state: &SerialState) -> Result<Self, SerialError> {
        Console::restore(out, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_the_output() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        for b in b"hi\n" {
            c.write(0, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn save_restore_save_is_identity() {
        let mut c = Console::new(Box::new(Sink::default()));
        c.write(3, 0x83); // DLAB
        c.write(0, 0x01);
        c.write(3, 0x03);
        c.write(7, 0x5a); // scratch
        let s1 = c.save();
        let c2 = Console::restore(Box::new(Sink::default()), &s1).unwrap();
        assert_eq!(c2.save(), s1);
        assert_eq!(s1.regs[8], 0x5a);
    }
}
